"""Resource preflight: does a pool fit the cluster? Answered in seconds, before any actor starts.

An actor that asks for more than any node has never starts, and Ray waits for it forever (a
`num_gpus: 1` pool on a CPU-only cluster hangs the stage silently). So before a stage starts a pool
(a Ray Data actor pool, a `ReplicaSet`, Ray Train's workers, a placement group) it states what the
pool asks for as *bundles* — one `{"CPU": c, "GPU": g, "memory": bytes}` per replica, each of which
must fit on ONE node — and `preflight` packs them onto the alive nodes' total resources (first fit,
largest first). A bundle that fits no node, or a pool whose bundles do not all fit at once, stops
the stage with a `ConfigError` naming the pool (its config path) and the shortfall.

It compares with the nodes' *totals*, not what is free now: a pool that fits an idle cluster will
start once the stage's earlier pools are gone. On an autoscaling cluster the totals are those of the
nodes already up; give the autoscaler a minimum that covers the largest pool.
"""

from __future__ import annotations

from almost_ray.cluster_config import ResourcesConfig
from almost_ray.config import Config
from almost_ray.config_base import ConfigError
from almost_ray.plan import make_plan
from almost_ray.train.config import TrainConfig

Bundle = dict[str, float]
# resource key -> how a person reads it
UNITS = {"CPU": ("CPU", "CPUs"), "GPU": ("GPU", "GPUs"), "memory": ("GiB of memory", "GiB of memory")}
GIB = 2**30


def pool_bundles(res: ResourcesConfig) -> list[Bundle]:
    """One bundle per replica of an actor pool configured by `res`."""
    bundle = {"CPU": float(res.num_cpus), "GPU": float(res.num_gpus)}
    if res.memory_gb:
        bundle["memory"] = res.memory_gb * GIB
    return [bundle] * res.concurrency


def train_bundles(cfg: TrainConfig) -> list[Bundle]:
    """One bundle per Ray Train worker (`ScalingConfig(num_workers, resources_per_worker)`)."""
    bundle = {"CPU": float(cfg.cpus_per_worker), "GPU": float(cfg.gpus_per_worker) if cfg.use_gpu else 0.0}
    return [bundle] * cfg.num_workers


def _amount(key: str, value: float) -> str:
    if key == "memory":
        return f"{value / GIB:g} GiB of memory"
    one, many = UNITS.get(key, (key, key))
    return f"{value:g} {one if value == 1 else many}"


def shortfall(name: str, bundles: list[Bundle], nodes: list[Bundle]) -> str | None:
    """Why `bundles` cannot all be placed on `nodes` (each node's total resources) at once, or None.

    Pure, so the arithmetic is tested without a cluster. The message names the pool and what is
    missing, per replica when one replica fits no node, else for the whole pool.
    """
    free = [dict(n) for n in nodes]
    totals = {k: sum(n.get(k, 0.0) for n in nodes) for k in {k for b in bundles for k in b}}
    placed = 0
    for bundle in sorted(bundles, key=lambda b: (b.get("GPU", 0), b.get("CPU", 0), b.get("memory", 0)), reverse=True):
        need = {k: v for k, v in bundle.items() if v > 0}
        home = next((f for f in free if all(f.get(k, 0.0) >= v for k, v in need.items())), None)
        if home is not None:
            for k, v in need.items():
                home[k] -= v
            placed += 1
            continue
        for key, value in need.items():
            largest = max((n.get(key, 0.0) for n in nodes), default=0.0)
            if value > largest:
                where = "the cluster has" if totals.get(key, 0.0) < value else "the largest node has"
                have = totals.get(key, 0.0) if where == "the cluster has" else largest
                return f"{name} pool: needs {_amount(key, value)} per replica, {where} {_amount(key, have)}"
        if not any(all(n.get(k, 0.0) >= v for k, v in need.items()) for n in nodes):
            wanted = " + ".join(_amount(k, v) for k, v in need.items())
            return f"{name} pool: needs {wanted} per replica on one node, no node has all of them"
        asked = {k: sum(b.get(k, 0.0) for b in bundles) for k in need}
        short = [k for k in need if asked[k] > totals.get(k, 0.0)] or list(need)
        key = short[0]
        return (f"{name} pool: needs {_amount(key, asked[key])} for {len(bundles)} replicas, the cluster has "
                f"{_amount(key, totals.get(key, 0.0))} (room for {placed} replicas at once)")
    return None


def node_resources() -> list[Bundle]:
    """Total resources of each alive node of the Ray cluster this process is connected to."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def preflight(name: str, bundles: list[Bundle]) -> None:
    """Raise `ConfigError` naming pool `name` (its config path) when `bundles` cannot all run at once.

    A no-op without Ray (nothing would be scheduled) or with no bundles.
    """
    import ray

    if not bundles or not ray.is_initialized():
        return
    problem = shortfall(name, bundles, node_resources())
    if problem:
        raise ConfigError(problem)


# The name the PPO stage calls for its placement groups' bundles.
preflight_bundles = preflight


def fits_together(pools: dict[str, list[Bundle]]) -> bool:
    """Whether all these pools can hold their replicas at the same time (else: one after another)."""
    import ray

    if not ray.is_initialized():
        return True
    return shortfall("+".join(pools), [b for bs in pools.values() for b in bs], node_resources()) is None


def gpu_memory_gb() -> float | None:
    """GiB of the smallest GPU on the cluster's GPU nodes, read by `nvidia-smi` on each (a task with no GPU of
    its own, pinned to the node); None where it cannot be read (no nvidia-smi: GPUs declared, not real)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def total_mib() -> list[float]:
        import subprocess

        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [float(x) for x in out.split()]

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) > 0]
    found = ray.get([total_mib.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
                     for node in nodes])
    sizes = [mib / 1024 for per_node in found for mib in per_node]
    return min(sizes) if sizes and all(found) else None


def plan_preflight(cfg: Config, stage: str) -> None:
    """The GPU memory plan (`almost-ray plan`) of `stage` on the cluster this process is connected to: the
    GPU counts of its nodes from Ray, their memory from `gpu_memory_gb`. Raises `ConfigError` naming the
    stage, role and shortfall; a no-op without Ray or GPUs. Where the memory cannot be read, only the GPU
    counts are checked."""
    import ray

    if not ray.is_initialized():
        return
    node_gpus = [int(n.get("GPU", 0)) for n in node_resources() if n.get("GPU", 0) > 0]
    if not node_gpus:
        return
    memory = gpu_memory_gb()
    plan = make_plan(cfg, node_gpus, 0, memory if memory is not None else float("inf"), only=[stage])
    if plan.problems:
        raise ConfigError("\n".join(plan.problems))
