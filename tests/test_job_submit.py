"""`jobs/rlsf.py` as a Ray job against a head started as a user starts one (`ray start --head`) with Ray's
default authentication: RAY_AUTH_MODE is left unset and a token exists, so Ray 2.60 turns token
authentication on. The README's `ray job submit` block, pasted as written, succeeds against it (and
fails without its `export RAY_AUTH_MODE=token`); the pipeline on tiny:llama submitted through the Jobs
SDK with the token ends SUCCEEDED with its outputs, and a bad stage name ends FAILED with the error in
the job log.

The head's token is its own (RAY_AUTH_TOKEN_PATH in its temp dir), standing for the ~/.ray/auth_token a
user's head and client share, so the test neither reads nor writes the user's ~/.ray. The head is always
stopped, by killing exactly its own processes (`ray stop` would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import tiny_pipeline_config

from almost_ray.runs.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the venv's `ray` and `python`: jobs run with its packages
RUNTIME_ENV = {
    "working_dir": str(REPO),
    "excludes": [".venv/", "runs/", ".git", "*.egg-info/", "bench/results/", "__pycache__/"],
    "env_vars": {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"},
}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


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
            if proc.pid != os.getpid() and any(temp_dir in part for part in proc.info["cmdline"] or []):
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


@dataclass
class Head:
    address: str          # the dashboard / job API, http://127.0.0.1:PORT
    token: str
    shell_env: dict       # a user's shell on this machine: the venv first on PATH, the head's token found
    temp_dir: Path
    metrics_port: int


@pytest.fixture(scope="module", name="head")
def head_fixture():
    """A private Ray head of 2 CPUs (its own temp dir, ports and token), started with Ray's default
    authentication mode; always stopped."""
    temp_dir = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # short: Unix socket paths are limited to ~107 bytes
    token_path = Path(temp_dir) / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    dashboard, metrics = free_port(), free_port()
    shell_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and k not in AUTH_VARIABLES}
    shell_env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_TOKEN_PATH=str(token_path),
                     PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    try:
        started = subprocess.run(
            [str(VENV_BIN / "ray"), "start", "--head", f"--port={free_port()}", f"--dashboard-port={dashboard}",
             "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp_dir}",
             # every port of its own: other Rays may run on this machine (defaults are fixed)
             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={free_port()}",
             "--include-dashboard=true", "--disable-usage-stats"],
            env=shell_env, timeout=240, capture_output=True, text=True)
        log = started.stdout + started.stderr
        assert started.returncode == 0, log[-5000:]
        assert "Token authentication is enabled for this Ray cluster" in log, log[-3000:]
        yield Head(f"http://127.0.0.1:{dashboard}", token_path.read_text(), shell_env, Path(temp_dir), metrics)
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def readme_submit_block() -> str:
    """The README's shell block that runs `ray job submit`, as a user would paste it."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if "ray job submit" in b]
    return block


def run_as_user(script: str, head: Head) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=head.shell_env,
                          capture_output=True, text=True, timeout=600)


def test_readme_ray_job_submit_works_against_a_head_with_default_token_auth(head):
    """The README's block with only the head's address filled in, and `--list` appended so the demo's
    25 minutes are not run: it uploads the working directory and runs jobs/rlsf.py there."""
    block = readme_submit_block()
    assert "http://HEAD:8265" in block and "export RAY_AUTH_MODE=token" in block
    script = block.replace("http://HEAD:8265", head.address).rstrip() + " --list\n"
    done = run_as_user(script, head)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "succeeded" in out and re.search(r"^queries\s", out, re.M) and re.search(r"^report\s", out, re.M)

    # the same block without the export is what the README used to say: the head refuses it
    without = "\n".join(line for line in script.splitlines() if "export RAY_AUTH_MODE" not in line)
    refused = run_as_user(without, head)
    assert refused.returncode != 0
    assert "Missing authentication token" in refused.stdout + refused.stderr


def test_the_head_refuses_a_client_without_the_token_and_serves_its_metrics_and_dashboards(head):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    with pytest.raises(AuthenticationError):
        JobSubmissionClient(head.address).list_jobs()
    client = JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})
    assert isinstance(client.list_jobs(), list)  # with the token, the same request is served
    # Prometheus scrapes without a token (k8s/monitoring.yaml), and the head writes Ray's Grafana
    # dashboards where docs/gpu-cluster.md copies them from
    with urllib.request.urlopen(f"http://127.0.0.1:{head.metrics_port}/metrics", timeout=30) as response:
        assert response.status == 200
    dashboards = list((head.temp_dir / "session_latest" / "metrics" / "grafana" / "dashboards").glob("*.json"))
    assert any(d.name.startswith("default") for d in dashboards), dashboards


@pytest.mark.slow
def test_pipeline_job_succeeds_on_a_local_head_and_a_bad_flag_fails_it(head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_pipeline_config(tmp_path)))
    client = JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})
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
