"""Dry placement: every pool replica, PPO role, vLLM engine (and the workers vLLM would start for it) and Ray
Train worker of a config's stages placed on the Ray cluster by the run's own placement code, each reporting
its node, bundle and GPU ids, without loading a model.

Ray schedules on the GPUs a node declares (`ray start --num-gpus`, `ray.cluster_utils.Cluster` nodes with
`num_gpus`) and hands each actor its GPU ids; nothing here touches CUDA. Each phase of the GPU memory plan
(`plan.stages`) is placed, reported and torn down before the next, as the stages run them:

- a Ray Data pool through `pools.map_pool`, a `ReplicaSet` through `replicas.ReplicaSet`, with a replica class
  that only reports where it is;
- Ray Train's workers through `TorchTrainer` with `train.loop.scaling_config` (gloo: no GPU is touched);
- PPO's roles and engines through `rl.roles.reserve` and `Placement.start`; a vLLM engine at tensor parallel
  > 1 holds no GPU and starts one worker per bundle of its placement group, as vLLM's Ray executor does with
  the `VLLM_RAY_BUNDLE_INDICES` the engine sets (`rl.rollout.vllm_engine_env`). `Placement.remove` ends it.
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from dataclasses import dataclass

import ray

from almost_ray.config import Config
from almost_ray.plan.stages import Phase, Pool, StagePlan, plan_stages, ppo_uses_vllm

LEDGER = "almost_ray_placement_ledger"


@dataclass
class Placed:
    """Where one replica (or one vLLM worker) landed."""

    stage: str
    pool: str
    rank: int
    node: str
    gpu_ids: list[str]
    bundle: int | None = None
    group: str = ""  # placement group id, "" outside one


@ray.remote(num_cpus=0)
class PlacementLedger:
    def __init__(self):
        self.rows: list[dict] = []

    def report(self, row: dict) -> None:
        self.rows.append(row)

    def take(self) -> list[dict]:
        rows, self.rows = self.rows, []
        return rows

    def count(self, pool: str) -> int:
        return sum(r["pool"] == pool for r in self.rows)


def report_here(pool: str, rank: int, bundle: int | None = None) -> None:
    """Called inside an actor or worker: tell the ledger where this process is and which GPUs it holds."""
    ctx = ray.get_runtime_context()
    group = ctx.get_placement_group_id() or ""
    ray.get(ray.get_actor(LEDGER).report.remote(dict(
        pool=pool, rank=rank, node=ctx.get_node_id(), gpu_ids=[str(g) for g in ctx.get_accelerator_ids()["GPU"]],
        bundle=bundle, group=group)))


class DryReplica:
    """A pool replica that loads nothing: it reports where it is when built, and holds its first batch until
    every replica of the pool has reported (Ray Data would otherwise finish a small dataset on the replicas
    that started first and drop the others unbuilt)."""

    def __init__(self, pool: str, replicas: int):
        self.pool, self.replicas, self.waited = pool, replicas, False
        report_here(pool, -1)

    def __call__(self, batch, **_call):
        import time

        ledger, deadline = ray.get_actor(LEDGER), time.monotonic() + 300
        while not self.waited and ray.get(ledger.count.remote(self.pool)) < self.replicas:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.pool}: fewer than {self.replicas} replicas started in 300 s")
            time.sleep(0.2)
        self.waited = True
        return batch


class DryRole:
    """A PPO role actor that loads nothing (`Placement.start` passes the role's arguments and rank)."""

    def __init__(self, pool: str, bundles: list[int], *_args, rank: int = 0, world: int = 1):
        report_here(pool, rank, bundles[rank] if bundles else None)

    def ready(self) -> bool:
        return True


@ray.remote(num_cpus=0)
class DryVLLMWorker:
    """What vLLM's Ray executor starts in each bundle of an engine's placement group."""

    def __init__(self, pool: str, rank: int, bundle: int):
        report_here(pool, rank, bundle)

    def ready(self) -> bool:
        return True


class DryEngine(DryRole):
    """A vLLM engine: at tensor parallel 1 it holds its GPU; above, it holds none and starts a worker with one
    GPU in each bundle named by the `VLLM_RAY_BUNDLE_INDICES` the real engine sets, in the placement group it
    was started in (captured by its children)."""

    def __init__(self, cfg: dict, *_args, rank: int = 0, world: int = 1):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from almost_ray.rl.config import PPOConfig
        from almost_ray.rl.rollout import vllm_engine_env

        ppo = PPOConfig.model_validate(cfg)
        env = vllm_engine_env(ppo)
        tp = ppo.rollout.tensor_parallel_size
        if tp == 1:
            report_here("ppo.rollout", rank, 0)
            self.workers = []
            return
        report_here("ppo.rollout engine", rank, 0)
        group = ray.util.get_current_placement_group()
        bundles = [int(i) for i in env["VLLM_RAY_BUNDLE_INDICES"].split(",")]
        per_worker = float(env["VLLM_RAY_PER_WORKER_GPUS"])
        self.workers = [
            DryVLLMWorker.options(num_gpus=per_worker, scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=b)).remote("ppo.rollout", rank * tp + i, b)
            for i, b in enumerate(bundles)
        ]
        ray.get([w.ready.remote() for w in self.workers])


def _open_replica_set(pool: Pool, stack: ExitStack) -> None:
    """A `ReplicaSet` of dry replicas, each given one batch; it stays up until the phase ends (RMSP's roles
    hold their replicas side by side)."""
    from almost_ray.cluster.replicas import ReplicaSet

    res = pool.config
    replicas = stack.enter_context(ReplicaSet(DryReplica, {"pool": pool.name, "replicas": res.concurrency}, res,
                                              f"{pool.name}.resources"))
    list(replicas.map([{"row": i} for i in range(res.concurrency * res.batch_size)]))


def _run_pool(pool: Pool) -> None:
    """A Ray Data pool of dry replicas, one block per replica (the stage runs it alone)."""
    from almost_ray.cluster.pools import stream_pool

    res = pool.config
    list(stream_pool([{"row": i} for i in range(res.concurrency * res.batch_size)], DryReplica,
                     {"pool": pool.name, "replicas": res.concurrency}, res, f"{pool.name}.resources"))


def _train_worker(job: dict) -> None:
    import ray.train

    ctx = ray.train.get_context()
    report_here(job["pool"], ctx.get_world_rank(), ctx.get_world_rank())


def _place_train(pool: Pool) -> None:
    """Ray Train's worker group as `train.loop.fit` asks for it (gloo, so no GPU is touched)."""
    from ray.train import RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from almost_ray.train.loop import scaling_config

    with tempfile.TemporaryDirectory(prefix="almost-ray-dry-") as tmp:
        TorchTrainer(_train_worker, train_loop_config={"pool": pool.name}, scaling_config=scaling_config(pool.config),
                     torch_config=TorchConfig(backend="gloo"),
                     run_config=RunConfig(name="dry-placement", storage_path=tmp)).fit()


def _place_ppo(pool: Pool) -> None:
    """PPO's placement groups and actors as `rl.trainer.start_roles` makes them, then `Placement.remove`."""
    from almost_ray.rl.roles import ROLLOUT, reserve

    cfg = pool.config
    vllm = ppo_uses_vllm(cfg)
    placement = reserve(cfg, separate_engines=vllm, timeout_s=120)
    try:
        c = cfg.model_dump(mode="json")
        for role, bundles in placement.where.items():
            if role != ROLLOUT:
                placement.start(role, DryRole, cfg, f"ppo.{role}", bundles)
        if vllm:
            placement.start(ROLLOUT, DryEngine, cfg, c)
        else:
            placement.start(ROLLOUT, DryRole, cfg, "ppo.rollout", placement.where[ROLLOUT])
        ray.get([a.ready.remote() for actors in placement.actors.values() for a in actors])
    finally:
        placement.remove()


def place_phase(phase: Phase) -> None:
    """Every GPU pool of one phase placed at the same time, as the stage holds them, then freed."""
    with ExitStack() as stack:
        ppo_started = False
        for pool in phase.pools:
            if pool.gpus <= 0 and pool.kind != "ppo":
                continue  # a CPU pool takes no GPU
            if pool.kind == "ppo":
                if not ppo_started:
                    _place_ppo(pool)
                    ppo_started = True
            elif pool.kind == "train":
                _place_train(pool)
            elif pool.kind == "replica_set":
                _open_replica_set(pool, stack)
            else:
                _run_pool(pool)


def place_stages(cfg: Config, model_configs=None, only: list[str] | None = None,
                 gpu_memory_gb: float = 80.0) -> list[tuple[str, Phase, list[Placed]]]:
    """Every phase of the plan of `cfg`'s stages (or `only`) placed on the connected Ray cluster, one after
    another: (stage, phase, where each replica landed)."""
    ledger = PlacementLedger.options(name=LEDGER, get_if_exists=True).remote()
    out = []
    try:
        plans: list[StagePlan] = plan_stages(cfg, gpu_memory_gb * 2**30, model_configs, only)
        for stage in plans:
            for phase in stage.phases:
                place_phase(phase)
                rows = ray.get(ledger.take.remote())
                out.append((stage.stage, phase, [Placed(stage=stage.stage, **row) for row in rows]))
    finally:
        ray.kill(ledger)
    return out


