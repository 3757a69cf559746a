"""How our Ray workers start: the allocator setting every worker process gets from `init_ray`."""

from __future__ import annotations

import resource

import pytest


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc malloc settings")
def test_a_ray_worker_reuses_memory_it_freed_instead_of_faulting_in_fresh_pages(ray_local):
    """A training step frees and re-allocates the same large tensors every step; each of its 65536 pages
    faulted in again costs system time (docs/performance.md "PPO")."""
    ray = ray_local

    def faults_of_a_repeated_allocation(mib: int = 256) -> int:  # defined here: shipped by value to the worker
        """Minor page faults of allocating and filling `mib` MiB right after freeing the same amount."""
        import resource

        import torch

        first = torch.ones(mib << 18)
        del first
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        second = torch.ones(mib << 18)
        del second
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    pages = (256 << 20) // resource.getpagesize()
    faults = ray.get(ray.remote(num_cpus=0)(faults_of_a_repeated_allocation).remote())
    assert faults < pages // 10, f"{faults} page faults re-allocating {pages} freed pages"


def test_a_value_the_user_already_set_is_left_to_the_user(monkeypatch):
    from almost_ray.cluster import WORKER_ENV_VARS, worker_runtime_env

    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert worker_runtime_env() == {"env_vars": WORKER_ENV_VARS}
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert worker_runtime_env() == {"env_vars": {"MALLOC_MMAP_MAX_": "0"}}


def test_the_worker_env_merges_with_a_submitted_jobs_runtime_env(monkeypatch):
    """Under `ray job submit`, ray.init merges our runtime_env with the job's; the job's env_vars are in
    the driver's environment, so a key both set is left out rather than refused by Ray."""
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from almost_ray.cluster import worker_runtime_env

    job = {"working_dir": ".", "env_vars": {"MALLOC_MMAP_MAX_": "65536", "HF_HOME": "/data/hf"}}
    for key, value in job["env_vars"].items():
        monkeypatch.setenv(key, value)
    merged = _merge_runtime_env(job, worker_runtime_env())
    assert merged is not None and merged["env_vars"]["MALLOC_MMAP_MAX_"] == "65536"
    assert merged["env_vars"]["MALLOC_TRIM_THRESHOLD_"] == str(64 << 30)
