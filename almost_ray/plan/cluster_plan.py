"""A whole plan: every stage planned (`plan.stages`), placed on the nodes (`plan.layout`), and its table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from almost_ray.config import Config
from almost_ray.plan.layout import PhaseLayout, place
from almost_ray.plan.memory import GIB, Estimate
from almost_ray.plan.stages import plan_stages


@dataclass
class Plan:
    layouts: list[PhaseLayout]
    problems: list[str]
    node_gpus: list[int]
    gpu_bytes: float

    @property
    def fits(self) -> bool:
        return not self.problems


def make_plan(cfg: Config, nodes: int | list[int], gpus_per_node: int, gpu_memory_gb: float,
              model_configs: Path | None = None, cpus_per_node: float | None = None,
              only: list[str] | None = None) -> Plan:
    """The plan of `cfg`'s stages (or those in `only`) on `nodes` nodes of `gpus_per_node` GPUs (or on nodes
    with the GPU counts listed in `nodes`) of `gpu_memory_gb` GiB each."""
    node_gpus = list(nodes) if isinstance(nodes, list) else [gpus_per_node] * nodes
    gpu_bytes = gpu_memory_gb * GIB
    stages = plan_stages(cfg, gpu_bytes, model_configs, only)
    layouts, problems = place(stages, node_gpus, gpu_bytes, cpus_per_node)
    return Plan(layouts, problems, node_gpus, gpu_bytes)


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}" if x else "-"


def _other(e: Estimate) -> float:
    return e.logits + e.context + (0.0 if e.reserved else e.kv_cache)


def _activations(e: Estimate) -> float:
    return e.activations + e.transient


def table(plan: Plan) -> str:
    """The plan as a Markdown table (GiB per GPU), one row per pool or role, a summary row per phase. A
    trained model's activations are freed during backward while its gradients (part of the fp32 states)
    fill in, so its total counts the larger of the two: the columns add up to more than the total."""
    head = ("| stage | pool / role | model | replicas x GPUs | weights | fp32 states | gathered | activations "
            "| KV cache | other | GiB per GPU | its fullest GPU | how |")
    rows = [head, "|" + "---|" * 13]
    for layout in plan.layouts:
        fullest = {}
        for gpu in layout.gpus:
            for m in gpu.members:
                fullest[m.pool] = max(fullest.get(m.pool, 0.0), gpu.used_bytes)
        for pool in layout.phase.pools:
            e = pool.estimate
            cpu = e.note == "CPU"
            rows.append(
                f"| {layout.stage} | {pool.name} | {pool.model} | {pool.replicas} x {pool.gpus:g} "
                f"| {'CPU' if cpu else _gib(e.weights)} | {_gib(e.states)} | {_gib(e.gathered)} "
                f"| {_gib(_activations(e))} | {_gib(e.kv_cache)} | {_gib(_other(e))} "
                f"| {'-' if cpu else _gib(e.total)} | {_gib(fullest.get(pool.name, 0.0))} | {pool.settings} |"
            )
        used = max((g.used_bytes for g in layout.gpus), default=0.0)
        rows.append(f"| {layout.stage} | *at once* | | {len(layout.gpus)} of {sum(plan.node_gpus)} GPUs "
                    f"| | | | | | | | {_gib(used)} of {plan.gpu_bytes / GIB:g} | |")
    return "\n".join(rows)
