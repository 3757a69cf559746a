"""Stage plans placed on a cluster of identical GPU nodes: which GPU each bundle lands on, each GPU's sum,
and what does not fit (named by stage, pool or role, and shortfall).

Bundles are placed as Ray places them: a placement group's bundles one after another onto the first node
with room (PACK), single replicas likewise; a bundle of whole GPUs takes free GPUs of its own, a fraction
of a GPU shares one with other fractions (Ray packs fractional GPU requests onto a GPU already in use).
Memory per GPU is then the sum of every replica on it, each counted on every GPU of its bundle (a
tensor-parallel engine holds its share on each of its GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from almost_ray.plan.memory import GIB
from almost_ray.plan.stages import Bundle, Member, Phase, StagePlan

EPS = 1e-9


@dataclass
class GPU:
    node: int
    index: int
    free: float = 1.0
    members: list[Member] = field(default_factory=list)

    @property
    def used_bytes(self) -> float:
        return sum(m.estimate.total for m in self.members)


@dataclass
class Node:
    index: int
    gpus: list[GPU]
    cpus: float | None


@dataclass
class PhaseLayout:
    """One phase placed: the GPUs in use and what went wrong."""

    stage: str
    phase: Phase
    gpus: list[GPU]
    problems: list[str]


def _fits(node: Node, bundle: Bundle) -> list[GPU] | None:
    """The GPUs of `node` that would take `bundle`, or None."""
    if node.cpus is not None and node.cpus + EPS < bundle.cpus:
        return None
    if bundle.gpus <= 0:
        return []
    if bundle.gpus < 1:
        shared = [g for g in node.gpus if bundle.gpus <= g.free + EPS]
        shared.sort(key=lambda g: (g.free >= 1 - EPS, g.index))  # a GPU already in use first
        return shared[:1] or None
    whole = [g for g in node.gpus if g.free >= 1 - EPS]
    return whole[: int(bundle.gpus)] if len(whole) >= bundle.gpus else None


def place_phase(stage: str, phase: Phase, node_gpus: list[int], gpu_bytes: float,
                cpus_per_node: float | None = None) -> PhaseLayout:
    """Place one phase on nodes with `node_gpus[n]` GPUs of `gpu_bytes` each."""
    cluster = [Node(n, [GPU(n, g) for g in range(count)], cpus_per_node) for n, count in enumerate(node_gpus)]
    problems = []
    for bundle in phase.bundles:
        pools = sorted({m.pool for m in bundle.members})
        if bundle.gpus > 1 and bundle.gpus != int(bundle.gpus):
            problems.append(f"{stage}: {', '.join(pools)}: {bundle.gpus:g} GPUs per bundle (Ray takes a fraction "
                            "of one GPU, or whole GPUs)")
            continue
        home = next(((node, gpus) for node in cluster if (gpus := _fits(node, bundle)) is not None), None)
        if home is None:
            problems.append(_unplaced(stage, phase, bundle, pools, node_gpus, cpus_per_node))
            continue
        node, gpus = home
        if node.cpus is not None:
            node.cpus -= bundle.cpus
        for gpu in gpus:
            gpu.free -= min(1.0, bundle.gpus)
            gpu.members.extend(bundle.members)
    used = [g for node in cluster for g in node.gpus if g.members]
    over: dict[tuple[str, ...], list[GPU]] = {}  # GPUs too full, by who is on them
    for gpu in used:
        if gpu.used_bytes > gpu_bytes + 1:
            over.setdefault(tuple(m.pool for m in gpu.members), []).append(gpu)
    for gpus in over.values():
        gpu = max(gpus, key=lambda g: g.used_bytes)
        parts = " + ".join(f"{m.pool} {m.estimate.total / GIB:.1f}" for m in gpu.members)
        where = f"{len(gpus)} GPUs hold" if len(gpus) > 1 else f"GPU {gpu.index} of node {gpu.node} holds"
        problems.append(f"{stage}: {where} {parts} = {gpu.used_bytes / GIB:.1f} GiB each, more than "
                        f"{gpu_bytes / GIB:g} GiB: short by {(gpu.used_bytes - gpu_bytes) / GIB:.1f} GiB")
    for pool in phase.pools:
        if pool.estimate.note and pool.estimate.note != "CPU":
            problems.append(f"{stage}: {pool.name}: {pool.estimate.note}")
    return PhaseLayout(stage, phase, used, problems)


def _unplaced(stage: str, phase: Phase, bundle: Bundle, pools: list[str], node_gpus: list[int],
              cpus_per_node: float | None) -> str:
    who = ", ".join(pools)
    largest = max(node_gpus, default=0)
    if bundle.gpus > largest:
        return (f"{stage}: {who}: needs {bundle.gpus:g} GPUs on one node per replica, the largest node has "
                f"{largest}: short by {bundle.gpus - largest:g} GPUs")
    if cpus_per_node is not None and bundle.cpus > cpus_per_node:
        return f"{stage}: {who}: needs {bundle.cpus:g} CPUs per replica, a node has {cpus_per_node:g}"
    gpus = sum(b.gpus for b in phase.bundles)
    total = sum(node_gpus)
    if gpus > total + EPS:
        return (f"{stage}: {who}: the stage needs {gpus:g} GPUs at once, the cluster has {total}: "
                f"short by {gpus - total:g} GPUs")
    return f"{stage}: {who}: no node has {bundle.gpus:g} free GPUs and {bundle.cpus:g} CPUs left for it"


def place(stages: list[StagePlan], node_gpus: list[int], gpu_bytes: float,
          cpus_per_node: float | None = None) -> tuple[list[PhaseLayout], list[str]]:
    """Every phase of every stage placed; the problems of all (config problems first)."""
    layouts, problems = [], []
    for stage in stages:
        problems += stage.problems
        for phase in stage.phases:
            placed = [place_phase(stage.stage, phase, node_gpus, gpu_bytes, cpus_per_node)]
            if placed[0].problems and stage.alone_if_crowded and len(phase.pools) > 1:  # rmsp's roles in turn
                placed = [place_phase(stage.stage, _alone(phase, pool.name), node_gpus, gpu_bytes, cpus_per_node)
                          for pool in phase.pools]
            layouts += placed
            problems += [p for layout in placed for p in layout.problems]
    return layouts, problems


def _alone(phase: Phase, pool: str) -> Phase:
    return Phase([p for p in phase.pools if p.name == pool],
                 [b for b in phase.bundles if any(m.pool == pool for m in b.members)])
