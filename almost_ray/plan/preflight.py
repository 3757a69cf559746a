"""The GPU memory plan before a stage starts on a real cluster: `almost-ray plan`'s numbers, with the GPU
counts Ray reports and the GPU memory `nvidia-smi` reads on each node (`cluster/preflight.py` checks CPU,
GPU and memory *counts* of pools; this checks that what each GPU holds fits it)."""

from __future__ import annotations

from almost_ray.cluster.preflight import node_resources
from almost_ray.config import Config
from almost_ray.config_base import ConfigError
from almost_ray.plan.cluster_plan import make_plan


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
