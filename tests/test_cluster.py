"""How our Ray workers start: the allocator setting every worker process gets from `init_ray`.

Its effect is measured, not tested: page faults per PPO step in a Ray actor, 228k without it and 20 to
1.8k with it (docs/performance.md); a synthetic allocation pattern faulted a varying share of its pages."""

from __future__ import annotations


def test_a_value_the_user_already_set_is_left_to_the_user(monkeypatch):
    from almost_ray.cluster.connect import WORKER_ENV_VARS, worker_runtime_env

    for key in WORKER_ENV_VARS:
        monkeypatch.delenv(key, raising=False)
    assert worker_runtime_env() == {"env_vars": WORKER_ENV_VARS}
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert worker_runtime_env() == {"env_vars": {k: v for k, v in WORKER_ENV_VARS.items() if k != "MALLOC_TRIM_THRESHOLD_"}}


def test_the_worker_env_merges_with_a_submitted_jobs_runtime_env(monkeypatch):
    """Under `ray job submit`, ray.init merges our runtime_env with the job's; the job's env_vars are in
    the driver's environment, so a key both set is left out rather than refused by Ray."""
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from almost_ray.cluster.connect import worker_runtime_env

    job = {"working_dir": ".", "env_vars": {"MALLOC_MMAP_MAX_": "65536", "HF_HOME": "/data/hf"}}
    for key, value in job["env_vars"].items():
        monkeypatch.setenv(key, value)
    merged = _merge_runtime_env(job, worker_runtime_env())
    assert merged is not None and merged["env_vars"]["MALLOC_MMAP_MAX_"] == "65536"
    assert merged["env_vars"]["MALLOC_TRIM_THRESHOLD_"] == str(64 << 30)
