"""Connecting to Ray: a cluster when an address is configured (or RAY_ADDRESS is set), else a local Ray;
the environment our worker processes start with; and checking that every node sees the run directory."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from almost_ray.cluster.config import RayConfig
from almost_ray.config_base import ConfigError
from almost_ray.data.atomic import atomic_open

# glibc's malloc serves every allocation over 32 MiB with its own mmap and unmaps it on free (and trims
# the heap above 128 KiB of free space), so a training step's gradients, logits and activations come
# back as fresh pages the kernel must fault in and zero, step after step: ~220k page faults and 0.5 s
# of system time in every 4 s PPO step of SmolLM2-135M on one CPU thread (docs/performance.md "PPO").
# With mmap off and trimming out of reach, a worker reuses the memory it freed: its resident size stays
# at its peak, which a training or generation actor reaches on its first step anyway.
# That holds only for the main arena. Every other thread gets an arena of its own made of 64 MiB heaps;
# a block larger than a heap is mmapped whatever MALLOC_MMAP_MAX_ says, and a heap that empties is
# unmapped, so a loop run in a thread (a Ray Train worker's, a threaded actor's) faulted its large
# tensors in again every step. One arena (MALLOC_ARENA_MAX=1) puts every thread on the main arena; small
# blocks stay in each thread's lock-free tcache, so the shared arena's lock is taken rarely.
# mallopt(3) names these variables; other allocators ignore them.
WORKER_ENV_VARS = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30), "MALLOC_ARENA_MAX": "1"}


def worker_runtime_env() -> dict:
    """The job-level runtime_env of our Ray workers: `WORKER_ENV_VARS`, less any the driver's own
    environment already sets (a value given to `ray job submit` or exported by the user wins, and Ray
    refuses to merge a job runtime_env whose env_vars repeat a key)."""
    return {"env_vars": {key: value for key, value in WORKER_ENV_VARS.items() if key not in os.environ}}


def init_ray(cfg: RayConfig) -> None:
    """Start or join Ray once per process; a no-op when Ray is already up (tests, `ray job submit`)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=worker_runtime_env())
    else:
        # "local": a Ray of our own, not whatever cluster another `ray start` on this machine left recorded
        ray.init(address="local", num_cpus=cfg.num_cpus, log_to_driver=True, runtime_env=worker_runtime_env())


def node_id() -> str:
    """The Ray node this code runs on ("" outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


VISIBILITY_TIMEOUT_S = 60.0


def _read_token(path: str) -> tuple[str, str | None]:
    """On one node: this node's address and the token text, or None when the file cannot be read there."""
    import ray

    try:
        text = Path(path).read_text()
    except OSError:
        text = None
    return ray.util.get_node_ip_address(), text


def invisible_nodes(answers: dict[str, tuple[str, str | None] | None], token: str) -> list[str]:
    """`node_id (ip)` of every node whose answer is not the token (None: the node did not answer in time)."""
    out = []
    for node_id, answer in answers.items():
        if answer is None:
            out.append(f"{node_id} (no answer within {VISIBILITY_TIMEOUT_S:.0f} s)")
        elif answer[1] != token:
            out.append(f"{node_id} ({answer[0]})")
    return out


def check_runs_dir_visible(runs_dir: Path) -> None:
    """Stop with a ConfigError unless every alive node reads what the driver writes under `runs_dir`.

    Stages hand each other files under `runs_dir` (models, comparisons, dialogues), read by actors on any
    node; a runs_dir on one node's local disk fails later and obscurely. So the driver writes a token
    file and a zero-CPU task pinned to each alive node (`NodeAffinitySchedulingStrategy(soft=False)`)
    reads it back, with the path exactly as the stages pass it (a relative path resolves against each
    worker's working directory, as the stages' paths do).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


    token = uuid.uuid4().hex
    path = Path(runs_dir) / ".visibility" / f"{token}.token"
    with atomic_open(path) as f:
        f.write(token)
    try:
        read = ray.remote(num_cpus=0, max_retries=0)(_read_token)
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        refs = {node: read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(str(path))
                for node in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=VISIBILITY_TIMEOUT_S)
        answers = {node: ray.get(ref) if ref in ready else None for node, ref in refs.items()}
        for ref in refs.values():
            if ref not in ready:
                ray.cancel(ref, force=True)
    finally:
        path.unlink(missing_ok=True)
    missing = invisible_nodes(answers, token)
    if missing:
        raise ConfigError(
            f"runs_dir: {runs_dir} (on the driver: {Path(runs_dir).resolve()}) is not visible from "
            f"{len(missing)} of {len(answers)} nodes: {', '.join(missing)}. Every node must see runs_dir: "
            "put it on shared storage (NFS, a KubeRay volume) and give its absolute path."
        )
