"""The one Ray Data actor-pool set-up every stage uses: rows through a callable class, one model per actor.

`map_pool` adds `ds.map_batches(Cls, ...)` with the pool's `ResourcesConfig`: a fixed-size
`ActorPoolStrategy(size=concurrency)` (each replica holds its model for the whole pass; Ray 2.51
deprecated `concurrency=`), the CPUs, GPUs and memory each replica reserves, rows per call, pandas
batches. It runs `preflight.preflight` first, so a pool that cannot fit the cluster stops the stage
in seconds, naming the pool's config path, instead of waiting for actors that never start.

Fault tolerance: Ray Data restarts a crashed replica and retries its batch without limit by default
(`max_restarts=-1`, `max_task_retries=-1`), and those are `ResourcesConfig`'s defaults. Ray 2.60 has
no named parameter for either — only `**ray_remote_args`, which is itself deprecated — so they are
passed (and Ray warns) only when a config changes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from almost_ray.cluster.config import ResourcesConfig
from almost_ray.cluster.memory import ensure_ledger
from almost_ray.cluster.preflight import pool_bundles, preflight
from almost_ray.cluster.replicas import MeasuredReplica, role_name

# Ray Data's own actor defaults (ActorPoolMapOperator._apply_default_remote_args).
RAY_DATA_DEFAULTS = {"max_restarts": -1, "max_task_retries": -1}


def pool_args(res: ResourcesConfig) -> dict[str, Any]:
    """Keyword arguments of `Dataset.map_batches` for an actor pool configured by `res`."""
    from ray.data import ActorPoolStrategy

    args: dict[str, Any] = dict(
        compute=ActorPoolStrategy(size=res.concurrency),
        num_cpus=res.num_cpus,
        num_gpus=res.num_gpus,
        batch_size=res.batch_size,
        batch_format="pandas",
    )
    if res.memory_gb:
        args["memory"] = res.memory_gb * 2**30
    retries = {"max_restarts": res.max_restarts, "max_task_retries": res.max_task_retries}
    if retries != RAY_DATA_DEFAULTS:
        args.update(retries)
    return args


def map_pool(ds, cls: type, kwargs: dict, res: ResourcesConfig, name: str):
    """`ds` mapped through a pool of `cls(**kwargs)` replicas; `name` is the pool's config path.

    Each replica reports its actor's peak memory for the stage's manifest (`replicas.MeasuredReplica`)."""
    preflight(name, pool_bundles(res))
    ensure_ledger()
    return ds.map_batches(MeasuredReplica, fn_constructor_kwargs=dict(cls=cls, kwargs=kwargs, role=role_name(name)),
                          **pool_args(res))


def stream_pool(rows: list[dict], cls: type, kwargs: dict, res: ResourcesConfig, name: str) -> Iterator[dict]:
    """Run `rows` through a pool and yield the output rows as they finish (any order)."""
    import ray.data

    if not rows:
        return
    blocks = max(1, len(rows) // res.batch_size)
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    yield from map_pool(ds, cls, kwargs, right_sized(res, blocks), name).iter_rows()


def right_sized(res: ResourcesConfig, blocks: int) -> ResourcesConfig:
    """`res` with no more replicas than there are blocks to answer: a replica without a block would only
    load its model (on a small machine, beside the replicas that work) and wait."""
    return res if res.concurrency <= blocks else res.model_copy(update={"concurrency": blocks})
