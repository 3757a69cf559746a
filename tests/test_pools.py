"""The one Ray Data actor-pool helper: ActorPoolStrategy from config, fault-tolerance options only
when changed, and no deprecation warning (Python's or Ray Data's log) from a real tiny pool."""

from __future__ import annotations

import logging
import sys
import time
import warnings

import pandas as pd
import ray
from ray.data import ActorPoolStrategy

from almost_ray.cluster.config import ResourcesConfig
from almost_ray.cluster.memory import actor_reports
from almost_ray.cluster.pools import pool_args, right_sized, stream_pool

# test classes are pickled by value: Ray workers cannot import the tests folder
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class AddOne:
    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return batch.assign(y=batch["x"] + 1)


def test_pool_args_from_config():
    args = pool_args(ResourcesConfig(concurrency=3, num_cpus=0.5, num_gpus=1, batch_size=4, memory_gb=2))
    assert isinstance(args["compute"], ActorPoolStrategy)
    assert (args["compute"].min_size, args["compute"].max_size) == (3, 3)
    assert (args["num_cpus"], args["num_gpus"], args["batch_size"], args["memory"]) == (0.5, 1, 4, 2 * 2**30)
    assert "concurrency" not in args and "max_restarts" not in args  # Ray Data's defaults, nothing deprecated
    changed = pool_args(ResourcesConfig(max_restarts=2, max_task_retries=1))
    assert (changed["max_restarts"], changed["max_task_retries"]) == (2, 1)


def test_a_pool_starts_no_more_replicas_than_it_has_blocks():
    res = ResourcesConfig(concurrency=2, num_cpus=1, batch_size=16)
    assert right_sized(res, blocks=1).concurrency == 1  # 8 judge questions: one block, one model load
    assert right_sized(res, blocks=1).num_cpus == 1
    assert right_sized(res, blocks=5) is res


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_a_tiny_pool_runs_without_any_deprecation_warning(ray_local):
    import ray.data

    records = _Records()
    started = time.time()
    logging.getLogger("ray.data").addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = list(stream_pool([{"x": i} for i in range(6)], AddOne, {}, ResourcesConfig(num_cpus=0.5,
                                    concurrency=2, batch_size=2), "test.resources"))
        assert sorted((r["x"], r["y"]) for r in rows) == [(i, i + 1) for i in range(6)]
        # the replicas that started reported their peak memory under the pool's name (replicas.MeasuredReplica);
        # Ray Data may retire the second before it starts when the first has answered every block
        assert 1 <= [r["role"] for r in actor_reports(started)].count("test") <= 2
        assert not [m for m in records.messages if "deprecat" in m.lower()]
        # Ray Data's own DataContext warns about its internal `use_push_based_shuffle` default; nothing
        # may come from the arguments we pass (`concurrency=`, `**ray_remote_args`) or from our code.
        ours = [w for w in caught if "concurrency" in str(w.message) or "ray_remote_args" in str(w.message)
                or "almost_ray" in w.filename]
        assert not ours, [str(w.message) for w in ours]

        # the check can fail: the old `concurrency=` call is caught by the same handler
        ds = ray.data.from_items([{"x": 1}]).map_batches(AddOne, concurrency=1, num_cpus=0.5, batch_format="pandas")
        assert ds.take_all() == [{"x": 1, "y": 2}]
        assert [m for m in records.messages if "deprecated" in m]
    finally:
        logging.getLogger("ray.data").removeHandler(records)
