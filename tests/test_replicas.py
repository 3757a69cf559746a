"""`ReplicaSet`: actors created once for many passes (counted actor-side), the same outputs as the Ray
Data pool on tiny:llama, and RMSP giving the same dialogues whether its roles run together or in turn."""

from __future__ import annotations

import json
import sys

import pandas as pd
import ray

from almost_ray.cluster.config import ResourcesConfig
from almost_ray.cluster.replicas import ModelReplica, ReplicaSet
from almost_ray.generate.pool import generation_replica, stream_generation
from almost_ray.models.config import ModelConfig, SamplingParams

# test classes are pickled by value: Ray workers cannot import the tests folder
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@ray.remote(num_cpus=0)
class Counter:
    def __init__(self):
        self.n = 0

    def inc(self):
        self.n += 1

    def get(self):
        return self.n


class CountedDouble:
    """Counts its constructions in a named actor: one per replica, not one per pass."""

    def __init__(self, counter: str):
        ray.get(ray.get_actor(counter).inc.remote())

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return batch.assign(y=batch["x"] * 2)


def test_replicas_are_created_once_for_many_passes(ray_local):
    counter = Counter.options(name="replica-ctor-count").remote()
    res = ResourcesConfig(concurrency=2, num_cpus=0.5, batch_size=3)
    with ReplicaSet(CountedDouble, {"counter": "replica-ctor-count"}, res, "test.resources") as replicas:
        assert ray.get(counter.get.remote()) == 0  # nothing starts before the first pass
        for rnd in range(3):
            rows = list(replicas.map({"x": i, "round": rnd} for i in range(7)))
            assert sorted((r["x"], r["y"]) for r in rows) == [(i, 2 * i) for i in range(7)]
        # chained passes share the same actors
        chained = list(replicas.map({"x": r["y"]} for r in replicas.map({"x": i} for i in range(5))))
        assert sorted(r["y"] for r in chained) == [4 * i for i in range(5)]
        assert replicas.started == 2
    assert ray.get(counter.get.remote()) == 2
    ray.kill(counter)


def test_replica_set_answers_like_the_ray_data_pool(ray_local):
    model = ModelConfig(ref="tiny:llama", dtype="float32", max_batch_size=4)
    sampling = SamplingParams(n=2, max_new_tokens=5, temperature=1.0, top_p=0.9, seed=3)
    res = ResourcesConfig(concurrency=1, num_cpus=1, batch_size=3)
    rows = [{"id": f"p{i}", "messages": json.dumps([{"role": "user", "content": q}])}
            for i, q in enumerate(["What is rain?", "Name a color.", "Why is the sky blue?", "Hi", "2+2?"])]
    via_ray_data = {r["id"]: r["responses"] for r in stream_generation(rows, model, sampling, res, "chat")}
    with ReplicaSet(ModelReplica, generation_replica(model, sampling, "chat"), res, "test.resources") as replicas:
        via_replicas = {r["id"]: json.loads(r["responses"]) for r in replicas.map(reversed(rows))}
    assert via_replicas == via_ray_data
