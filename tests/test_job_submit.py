"""`jobs/rlsf.py` as a Ray job: a local head of its own (`ray start --head`), the pipeline on tiny:llama
submitted through the Jobs SDK with a `working_dir` upload, SUCCEEDED and its outputs checked; a bad
stage name ends FAILED with the error in the job log. The head is always stopped, by killing exactly its
own processes (`ray stop` would stop every Ray on the machine). Slow: `make test-slow`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from conftest import tiny_pipeline_config

from almost_ray.runs.manifest import read_manifest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RUNTIME_ENV = {
    "working_dir": str(REPO),
    "excludes": [".venv/", "runs/", ".git", "*.egg-info/", "bench/results/", "__pycache__/"],
    "env_vars": {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"},
}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_head(temp_dir: str) -> None:
    """Kill the processes of the head started with `temp_dir` (and their children: workers, the job driver)."""
    import psutil

    owned = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                owned += [proc, *proc.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in owned:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(owned, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def wait_for(client, job_id: str, timeout_s: float) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(2)
    return "TIMEOUT"


@contextmanager
def local_head():
    """A private Ray head of 2 CPUs (its own temp dir and ports); yields its Jobs SDK client; always stopped."""
    from ray.job_submission import JobSubmissionClient

    temp_dir = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # short: Unix socket paths are limited to ~107 bytes
    dashboard = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # A private head on loopback: no token auth, so neither it nor this client depends on a token file
    # (~/.ray/auth_token) that another Ray on this machine may have written.
    env["RAY_AUTH_MODE"] = "disabled"
    ray_bin = str(Path(sys.executable).with_name("ray"))  # the venv's Ray: jobs run with its Python
    try:
        started = subprocess.run([ray_bin, "start", "--head", f"--port={free_port()}", f"--dashboard-port={dashboard}",
                        "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp_dir}",
                        # every port of its own: other Rays may run on this machine (defaults are fixed)
                        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                        f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                        "--include-dashboard=true", "--disable-usage-stats"],
                       env=env, timeout=240, capture_output=True, text=True)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-3000:]
        yield JobSubmissionClient(f"http://127.0.0.1:{dashboard}")
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_pipeline_job_succeeds_on_a_local_head_and_a_bad_flag_fails_it(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_pipeline_config(tmp_path)))
    with local_head() as client:
        entry = f"{sys.executable} jobs/rlsf.py --config {config}"
        job = client.submit_job(entrypoint=f"{entry} --until train_sft", runtime_env=RUNTIME_ENV)
        status = wait_for(client, job, 900)
        logs = client.get_job_logs(job)
        assert status == "SUCCEEDED", logs[-4000:]
        assert "=== [1/6] queries" in logs and "=== [6/6] train_sft" in logs and "train_sft: done in" in logs
        run = tmp_path / "runs" / "tiny"
        for stage in ("queries", "compare", "rm", "eval_rm", "rmsp", "sft"):
            assert read_manifest(run / stage) is not None, stage
        assert (run / "sft" / "model" / "config.json").is_file()

        bad = client.submit_job(entrypoint=f"{entry} --only no_such_stage", runtime_env=RUNTIME_ENV)
        assert wait_for(client, bad, 120) == "FAILED"
        assert "unknown stage 'no_such_stage'" in client.get_job_logs(bad)
