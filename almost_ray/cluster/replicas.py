"""Model replicas: the one replica class every pool uses, and long-lived sets of them for stages that loop.

`ModelReplica` holds one model in one actor (a generator, or a reward model) and answers each pandas
batch with a stage's own pure function, `answer(model, batch, **options, **call)`: the stages keep their
logic (how a rung, a role or a scorer turns a batch into outputs, unit-tested without Ray) and this module
keeps the Ray part. A Ray Data actor pool (`pools.stream_pool`) and a `ReplicaSet` run the same class.

A Ray Data actor pool lives as long as one dataset, so a stage that loops — RMSP's turns, query
mining's rounds — would build a new pool, and load the model again, on every turn or round (15 s for
the embedded model on a CPU, minutes for a 30B model on GPUs), and RMSP's one streaming dataset held
a pool per role *and per turn* at once. `ReplicaSet` holds `concurrency` actors of one callable class
(`ModelReplica`, as Ray Data's pools do, taking and returning a pandas batch) for as long as the stage
wants them; `map(rows)` streams rows through them
in batches of `batch_size`, at most `IN_FLIGHT` batches queued per actor, and yields the rows of each
batch as it finishes (any order: stages key rows and put them back in order with `ShardedJsonl`).
`map` consumes its input lazily, so maps can be chained (one role's output is the next role's input)
and all actors of the chain work at the same time.

Fault tolerance is Ray's: actors are created with the pool's `max_restarts`/`max_task_retries`
(by default -1: a crashed replica is restarted, reloading its model, and the batches queued on it are
retried there; tests/test_faults.py kills an RMSP reward-model replica mid-stage and gets the
uninterrupted run's dialogues byte for byte).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any

from almost_ray.cluster.config import ResourcesConfig
from almost_ray.cluster.memory import ensure_ledger, report_peak
from almost_ray.cluster.preflight import pool_bundles, preflight

IN_FLIGHT = 2  # batches queued per actor: one running, one waiting, so an actor never idles between calls


def generator_model(model) -> dict:
    """A `ModelReplica`'s model spec for a generator (`models.config.ModelConfig`)."""
    return {"generator": model.model_dump()}


def reward_model(ref: str, dtype: str = "auto", max_length: int = 1024, batch_size: int = 8) -> dict:
    """A `ModelReplica`'s model spec for a reward model (`models.reward.RewardModel`)."""
    return {"reward_model": dict(ref=ref, dtype=dtype, max_length=max_length, batch_size=batch_size)}


class ModelReplica:
    """One model (a `generator_model` or `reward_model` spec) and the stage function that answers batches."""

    def __init__(self, answer: Callable, model: dict, options: dict | None = None):
        # torch and transformers load here, in the actor, never in the driver that builds the pool
        if "generator" in model:
            from almost_ray.models.config import ModelConfig
            from almost_ray.models.generator import make_generator

            self.model = make_generator(ModelConfig.model_validate(model["generator"]))
        else:
            from almost_ray.models.reward import RewardModel

            self.model = RewardModel(**model["reward_model"])
        self.answer = answer
        self.options = options or {}

    def __call__(self, batch, **call):
        return self.answer(self.model, batch, **self.options, **call)


class MeasuredReplica:
    """A replica class `cls(**kwargs)` that reports its actor's peak after every batch it answers.

    What `pools.map_pool` gives Ray Data (which owns its actors' lifetimes, so nobody can ask them at the
    end) and what `ReplicaSet` holds in each actor, so both kinds of pool report the same way (`memory.py`)."""

    def __init__(self, cls: type, kwargs: dict, role: str):
        self.replica = cls(**kwargs)
        self.role = role
        report_peak(role)  # the model is loaded: a replica that never gets a batch still counts

    def __call__(self, batch, **call):
        out = self.replica(batch, **call)
        report_peak(self.role)
        return out



def role_name(pool: str) -> str:
    """A pool's config path as the role its memory is reported under (`rmsp.assistant.resources` -> `rmsp.assistant`)."""
    return pool.removesuffix(".resources")


class _Holder:
    """The actor: holds one `cls(**kwargs)` and answers a list of rows with a list of rows; reports its
    peak memory after each call, as a Ray Data pool replica does (`MeasuredReplica`), and says how
    long the replica took to build (its model load, with the first answer) and to answer."""

    def __init__(self, cls: type, kwargs: dict, role: str):
        t0 = time.perf_counter()
        self.replica = MeasuredReplica(cls, kwargs, role)
        self.load_s = time.perf_counter() - t0

    def run(self, rows: list[dict], call: dict) -> dict:
        import pandas as pd

        t0 = time.perf_counter()
        out = self.replica(pd.DataFrame(rows), **call).to_dict("records")
        load_s, self.load_s = self.load_s, 0.0
        return {"rows": out, "call_s": time.perf_counter() - t0, "load_s": load_s}


class ReplicaSet:
    """`res.concurrency` actors of `cls(**kwargs)`, each reserving `res`'s CPUs/GPUs/memory; `name` (the
    pool's config path) is what the preflight's error names. The actors start on the first `map` (a
    stage that only replays saved outputs never loads a model) and stay until `close`; use it as a
    context manager so they, and their models, are freed however the stage ends."""

    def __init__(self, cls: type, kwargs: dict, res: ResourcesConfig, name: str):
        self.cls, self.kwargs, self.res, self.name = cls, kwargs, res, name
        self.actors: list = []
        self.started = 0  # actors created by this set: once per replica, whatever the number of passes
        # where the time went, summed over replicas, per kind of call (its `call` values, "all" for none):
        # seconds building replicas (model loads, counted with the first call), seconds answering, batches, rows
        self.work: dict[str, dict[str, float]] = {}

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
        # A subclass named after the pool, so the dashboard and the actor table say what an actor holds
        # ("RmspRewardModelReplica", "QueriesReplica"; not "_Holder" for every role).
        name = "".join(part.title() for part in re.split(r"[._]", role_name(self.name))) + "Replica"
        holder = type(name, (_Holder,), {})
        actor = ray.remote(holder).options(**options)
        self.actors = [actor.remote(self.cls, self.kwargs, role_name(self.name)) for _ in range(res.concurrency)]
        self.started += len(self.actors)

    def map(self, rows: Iterable[dict], **call) -> Iterator[dict]:
        """Every row through one replica call (in batches); rows of a batch come back when it is done.

        `call` is passed to each replica call (`replica(batch, **call)`): one set of replicas can serve
        several maps that ask it different things (RMSP's assistant and user on one model)."""
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
                pending[self.actors[i].run.remote(batch, call)] = i
                load[i] += 1
            if not pending:
                return
            [done], _ = ray.wait(list(pending), num_returns=1)
            load[pending.pop(done)] -= 1
            answer = ray.get(done)
            work = self.work.setdefault("/".join(map(str, call.values())) or "all",
                                        {"load_s": 0.0, "busy_s": 0.0, "batches": 0, "rows": 0})
            work["load_s"] += answer["load_s"]
            work["busy_s"] += answer["call_s"]
            work["batches"] += 1
            work["rows"] += len(answer["rows"])
            yield from answer["rows"]

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> ReplicaSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
