"""Peak memory per stage (memory.py): the manifest's summary, the report's cell, the driver's per-stage
window, and actors reporting to the ledger (PPO's way: asked by the driver before they are killed)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import ray

from almost_ray.cluster import memory

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_summary_is_the_largest_actor_per_role_and_overall():
    reports = [{"role": "rmsp.assistant", "rss_mib": 900.0, "cuda_mib": None},
               {"role": "rmsp.assistant", "rss_mib": 950.5, "cuda_mib": None},
               {"role": "rmsp.reward_model", "rss_mib": 700.0, "cuda_mib": None}]
    s = memory.summarize(1234.56, "stage", reports)
    assert s == {"driver_peak_mib": 1234.6, "driver_window": "stage",
                 "actors_peak_mib": {"max": 950.5, "actors": 3,
                                     "by_role": {"rmsp.assistant": 950.5, "rmsp.reward_model": 700.0}}}
    gpu = memory.summarize(10, "process", [{"role": "ppo.policy", "rss_mib": 5.0, "cuda_mib": 2048.0},
                                            {"role": "ppo.critic", "rss_mib": 6.0, "cuda_mib": None}])
    assert gpu["actors_cuda_peak_mib"] == {"max": 2048.0, "by_role": {"ppo.policy": 2048.0}}
    empty = memory.summarize(10, "stage", [])
    assert empty["actors_peak_mib"] == {"max": None, "actors": 0, "by_role": {}}
    assert "actors_cuda_peak_mib" not in empty
    assert memory.peak_cell(s) == "1235 / 950"
    assert memory.peak_cell(empty) == "10 / —"
    assert memory.peak_cell(None) == ""


def _fresh_pages(mib: int):
    """`mib` MiB of new resident pages, whatever the allocator holds already: an anonymous mapping of its
    own (a bytearray might reuse memory an earlier test freed, and then no peak would move)."""
    import mmap

    block = mmap.mmap(-1, mib * 2**20)
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1
    return block


def test_driver_peak_is_per_window():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs here (not Linux): the driver's peak is its whole process's")
    memory.reset_driver_peak()
    before = memory.driver_peak_mib()
    if before > memory.current_rss_mib() + 50:
        pytest.skip("this kernel does not lower VmHWM on a write of 5 to /proc/self/clear_refs, "
                    "so no per-stage window can be measured here")
    block = _fresh_pages(200)
    grown = memory.driver_peak_mib()
    assert grown >= before + 150
    block.close()
    assert memory.driver_peak_mib() >= grown - 1  # the peak stays after the memory is freed ...
    memory.reset_driver_peak()
    assert memory.driver_peak_mib() < grown - 150  # ... until a new window starts
    assert memory._driver_window == "stage"


class Holder:
    """An actor that loads torch and holds a 100 MiB tensor: its peak must show it."""

    def __init__(self):
        import torch

        self.x = torch.ones(25 * 2**20)  # float32: 100 MiB

    def ready(self) -> bool:
        return True


def test_actors_asked_before_they_are_killed_report_to_the_ledger(ray_local):
    started = time.time()
    memory.ensure_ledger()
    actors = [ray.remote(Holder).options(num_cpus=0.1).remote() for _ in range(2)]
    ray.get([a.ready.remote() for a in actors])
    memory.gather({"test.holder": actors})
    for a in actors:
        ray.kill(a)
    reports = [r for r in memory.actor_reports(started) if r["role"] == "test.holder"]
    assert len(reports) == 2 and all(r["rss_mib"] > 150 for r in reports)  # torch + 100 MiB
    s = memory.summarize(0, "stage", reports)
    assert s["actors_peak_mib"]["by_role"]["test.holder"] == max(r["rss_mib"] for r in reports)
    assert not memory.actor_reports(time.time() + 60)  # reports from before a stage started are not its


def test_the_ledger_outlives_a_second_stage_start(ray_local):
    """Every pool start calls `ensure_ledger`; the second must not drop the handle that keeps it alive."""
    memory.ensure_ledger()
    memory.ensure_ledger()
    import gc

    gc.collect()
    time.sleep(1)
    assert ray.get(ray.get_actor(memory.LEDGER).since.remote(time.time() + 60)) == []


class Reporter:
    def report(self) -> None:
        self.grown = bytearray(64 * 2**20)  # a higher peak each call, so each call sends a report
        memory.report_peak("test.reporter")


def test_a_lost_ledger_never_fails_the_work_it_measures(ray_local, monkeypatch):
    """The ledger's node can be lost mid-stage (the lost-node fault test): a replica's report is dropped,
    not raised into its batch, and the manifest says the actors' peaks were lost."""
    memory.ensure_ledger()
    reporter = ray.remote(Reporter).options(num_cpus=0.1).remote()
    ray.get(reporter.report.remote())  # the replica now holds the ledger's handle
    ray.kill(ray.get_actor(memory.LEDGER))
    memory._held = None
    ray.get(reporter.report.remote())  # must not raise
    ray.kill(reporter)

    class Unreachable:
        class since:
            @staticmethod
            def remote(_started):
                raise ray.exceptions.ActorUnavailableError("unreachable", None)

    monkeypatch.setattr(ray, "get_actor", lambda name: Unreachable)
    mem = memory.stage_memory(time.time())
    assert mem["actors_peak_mib"]["ledger"] == "lost" and mem["actors_peak_mib"]["actors"] == 0
