"""Long-lived model replicas: a set of Ray actors created once and used for many passes over rows.

A Ray Data actor pool lives as long as one dataset, so a stage that loops — RMSP's turns, query
mining's rounds — would build a new pool, and load the model again, on every turn or round (15 s for
the embedded model on a CPU, minutes for a 30B model on GPUs), and RMSP's one streaming dataset held
a pool per role *and per turn* at once. `ReplicaSet` holds `concurrency` actors of one callable class
(the same classes Ray Data uses: `GenerationReplica`, `RoleReplica`, `CandidateScorer`, taking and
returning a pandas batch) for as long as the stage wants them; `map(rows)` streams rows through them
in batches of `batch_size`, at most `IN_FLIGHT` batches queued per actor, and yields the rows of each
batch as it finishes (any order: stages key rows and put them back in order with `ShardedJsonl`).
`map` consumes its input lazily, so maps can be chained (one role's output is the next role's input)
and all actors of the chain work at the same time.

Fault tolerance is Ray's: actors are created with the pool's `max_restarts`/`max_task_retries`
(a crashed replica is restarted, reloading its model, and its batch is retried).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from almost_ray.config import ResourcesConfig
from almost_ray.memory import MeasuredReplica, ensure_ledger
from almost_ray.pools import role_name
from almost_ray.preflight import pool_bundles, preflight

IN_FLIGHT = 2  # batches queued per actor: one running, one waiting, so an actor never idles between calls


class _Holder:
    """The actor: holds one `cls(**kwargs)` and answers a list of rows with a list of rows; reports its
    peak memory after each call, as a Ray Data pool replica does (`memory.MeasuredReplica`)."""

    def __init__(self, cls: type, kwargs: dict, role: str):
        self.replica = MeasuredReplica(cls, kwargs, role)

    def run(self, rows: list[dict]) -> list[dict]:
        import pandas as pd

        return self.replica(pd.DataFrame(rows)).to_dict("records")


class ReplicaSet:
    """`res.concurrency` actors of `cls(**kwargs)`, each reserving `res`'s CPUs/GPUs/memory; `name` (the
    pool's config path) is what the preflight's error names. The actors start on the first `map` (a
    stage that only replays saved outputs never loads a model) and stay until `close`; use it as a
    context manager so they, and their models, are freed however the stage ends."""

    def __init__(self, cls: type, kwargs: dict, res: ResourcesConfig, name: str):
        self.cls, self.kwargs, self.res, self.name = cls, kwargs, res, name
        self.actors: list = []
        self.started = 0  # actors created by this set: once per replica, whatever the number of passes

    def _start(self) -> None:
        import ray

        res = self.res
        preflight(self.name, pool_bundles(res))
        options: dict[str, Any] = dict(
            num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_restarts=res.max_restarts,
            max_task_retries=res.max_task_retries,
        )
        if res.memory_gb:
            options["memory"] = res.memory_gb * 2**30
        ensure_ledger()
        actor = ray.remote(_Holder).options(**options)
        self.actors = [actor.remote(self.cls, self.kwargs, role_name(self.name)) for _ in range(res.concurrency)]
        self.started += len(self.actors)

    def map(self, rows: Iterable[dict]) -> Iterator[dict]:
        """Every row through one replica call (in batches); rows of a batch come back when it is done."""
        import ray

        if not self.actors:
            self._start()
        source = iter(rows)
        batch_size = self.res.batch_size
        load = {i: 0 for i in range(len(self.actors))}
        pending: dict[Any, int] = {}  # result ref -> actor index
        exhausted = False
        while True:
            while not exhausted and len(pending) < IN_FLIGHT * len(self.actors):
                batch = list(islice(source, batch_size))
                if not batch:
                    exhausted = True
                    break
                i = min(load, key=load.get)  # the least busy actor
                pending[self.actors[i].run.remote(batch)] = i
                load[i] += 1
            if not pending:
                return
            [done], _ = ray.wait(list(pending), num_returns=1)
            load[pending.pop(done)] -= 1
            yield from ray.get(done)

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> ReplicaSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
