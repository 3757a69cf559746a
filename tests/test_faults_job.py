"""Fault test of the pipeline job (docs/reliability.md): `jobs/rlsf.py` submitted to a local
head, its driver SIGKILLed in the middle of `compare` (after `queries` finished), and the same job
submitted again. `make test-faults` runs it (slow: a head of its own and three jobs).
"""

from __future__ import annotations

import hashlib
import signal
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_pipeline_config
from test_faults import _wait_for
from test_job_submit import (
    RUNTIME_ENV,
    TERMINAL,
    head_fixture,  # noqa: F401 (the `head` fixture, by its name=: a Ray head with token auth)
    wait_for,
)

from almost_ray.runs.manifest import read_manifest

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def _rows_on_disk(compare: Path) -> int:
    """Response rows `compare` has kept so far: finished ladder parts and the shards of unfinished ones."""
    parts = list(compare.glob("parts/hhh-*.jsonl"))
    shards = [f for f in compare.glob("parts/.hhh-*.jsonl.shards/shard-*.jsonl")
              if not (compare / "parts" / f.parent.name[1 : -len(".shards")]).exists()]  # not merged yet
    return sum(f.read_bytes().count(b"\n") for f in [*parts, *shards])


def _kill_driver(run_name: str) -> int:
    """SIGKILL the job's driver: the Python process running `jobs/rlsf.py ... run_name=<run_name>`."""
    import psutil

    killed = 0
    for proc in psutil.process_iter(["cmdline"]):
        parts = proc.info["cmdline"] or []
        if "jobs/rlsf.py" in parts and f"run_name={run_name}" in parts:
            proc.send_signal(signal.SIGKILL)
            killed += 1
    return killed


def _digest(path: Path) -> tuple[int, str]:
    data = path.read_bytes()
    return data.count(b"\n"), hashlib.sha256(data).hexdigest()


OUTPUTS = ("queries/queries.jsonl", "compare/responses.jsonl", "compare/comparisons.jsonl")


def test_a_killed_pipeline_job_resubmitted_skips_finished_stages_and_resumes_compare(tmp_path, head):
    raw = tiny_pipeline_config(tmp_path)
    raw["compare"]["shard_size"] = 1  # one row per shard and per batch: compare moves in small steps
    for rung in raw["compare"]["ladder"]:
        rung["resources"] = {**rung["resources"], "batch_size": 1}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    runs = tmp_path / "runs"

    def entry(run_name: str) -> str:
        return f"{sys.executable} jobs/rlsf.py --config {config} --until compare --set run_name={run_name}"

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})
    job = client.submit_job(entrypoint=entry("killed"), runtime_env=RUNTIME_ENV)
    compare = runs / "killed" / "compare"

    def mid_compare() -> bool:
        return read_manifest(runs / "killed" / "queries") is not None and _rows_on_disk(compare) > 0

    _wait_for(lambda: mid_compare() or str(client.get_job_status(job).value) in TERMINAL, 900,
              "a first compare shard")
    assert _kill_driver("killed") == 1, client.get_job_logs(job)[-3000:]
    assert wait_for(client, job, 120) == "FAILED"
    kept = _rows_on_disk(compare)  # the driver is dead: nothing moves
    assert read_manifest(compare) is None, "compare finished before the driver was killed"
    queries = (runs / "killed" / "queries" / "queries.jsonl").read_bytes().count(b"\n")
    rows = 2 * queries  # both rungs answer every query
    assert 1 <= kept < rows

    again = client.submit_job(entrypoint=entry("killed"), runtime_env=RUNTIME_ENV)
    status, logs = wait_for(client, again, 900), client.get_job_logs(again)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "queries: skipped (done;" in logs and "compare: done in" in logs, logs[-4000:]
    pools = read_manifest(compare)["metrics"]["pools"]
    assert sum(p["generated"] for p in pools.values()) == rows - kept  # only what was not on disk

    ref = client.submit_job(entrypoint=entry("ref"), runtime_env=RUNTIME_ENV)
    assert wait_for(client, ref, 900) == "SUCCEEDED", client.get_job_logs(ref)[-4000:]
    for name in OUTPUTS:
        assert _digest(runs / "killed" / name) == _digest(runs / "ref" / name), name
    assert read_manifest(compare)["counts"] == read_manifest(runs / "ref" / "compare")["counts"]
