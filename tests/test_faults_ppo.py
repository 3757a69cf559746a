"""Fault tests of PPO (docs/reliability.md): a role actor killed mid-iteration, and the
`almost-ray ppo` driver killed after a checkpoint. Each run is compared, iteration by iteration and
weight by weight, with an uninterrupted run of the same config and seed (the module's `reference`),
within the tolerances of tests/test_rl_ppo_slow.py's resume test. `make test-faults` runs them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_ppo
from test_faults import _alive_actors, _kill_group, _subprocess_env, _wait_for

from almost_ray.rl.checkpoint import latest_iteration
from almost_ray.rl.config import PPOConfig
from almost_ray.rl.failures import RESTARTS
from almost_ray.runs.manifest import read_manifest

pytestmark = [pytest.mark.faults, pytest.mark.slow]

ITERATIONS = 6
SMALL = dict(
    total_episodes=4 * ITERATIONS, rollout_batch_size=4, minibatch_size=2, micro_batch_size=2, ppo_epochs=2,
    max_new_tokens=6, lr=1e-3, min_lr=1e-4, critic_lr=1e-3, checkpoint_every=2, torch_threads=1, dtype="float32",
    # every role in one 1-CPU bundle, the engine beside it: fits the 2-CPU `ray_local`
    colocate=[["policy", "critic", "reference", "reward"]], policy_resources={"num_cpus": 0.25},
    critic_resources={"num_cpus": 0.25}, reference_resources={"num_cpus": 0.25},
    reward_resources={"num_cpus": 0.25}, rollout={"num_cpus": 0.5},
)
COMPARED = ("episodes", "reward_mean", "reward_std", "kl", "policy_loss", "value_loss", "clip_frac",
            "value_clip_frac", "approx_kl", "lr", "response_length", "eos_rate")



@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("".join(f"Tell me about topic {i}.\n" for i in range(32)))
    return path


def _cfg(tiny_rm: Path) -> PPOConfig:
    return PPOConfig(policy="tiny:llama", reward_model=str(tiny_rm), **SMALL)


def _metrics(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(stage_dir / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory, tiny_rm, prompts) -> Path:
    """The uninterrupted run."""
    out = run_ppo(_cfg(tiny_rm), tmp_path_factory.mktemp("ref") / "run", prompts)
    assert [r["iteration"] for r in _metrics(out)] == list(range(1, ITERATIONS + 1))
    return out


def _assert_same_run(got: Path, ref: Path) -> None:
    rows, want = _metrics(got), _metrics(ref)
    assert [r["iteration"] for r in rows] == list(range(1, ITERATIONS + 1))  # none lost, none twice
    for a, b in zip(rows, want):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], abs=1e-4), (a["iteration"], key, a[key], b[key])
    wa, wb = _weights(got), _weights(ref)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-5), name


def test_a_killed_ppo_role_actor_restarts_the_roles_from_the_last_checkpoint(
        ray_local, tmp_path, tiny_rm, prompts, reference, capsys):
    """The critic's process is SIGKILLed once iteration 3's metrics are logged (checkpoints every 2):
    `train` sees the dead actor, starts every role again from the checkpoint after iteration 2, says
    so, counts the restart, and the run's metrics and final weights equal the uninterrupted run's."""
    stage_dir = tmp_path / "killed" / "ppo"
    fault: dict = {}

    def kill_the_critic():
        try:
            fault["logged"] = _wait_for(
                lambda: (stage_dir / "metrics.jsonl").is_file() and len(_metrics(stage_dir)) >= 3, 600,
                "iteration 3's metrics") and len(_metrics(stage_dir))
            critic = _wait_for(lambda: _alive_actors("CriticActor"), 60, "the critic actor")
            os.kill(critic[0]["Pid"], signal.SIGKILL)
        except BaseException as err:  # reported by the main thread
            fault["error"] = err

    killer = threading.Thread(target=kill_the_critic, daemon=True)
    killer.start()
    out = run_ppo(_cfg(tiny_rm), tmp_path / "killed", prompts)
    killer.join(timeout=60)
    assert "error" not in fault, fault.get("error")
    assert fault["logged"] < ITERATIONS, "the run ended before the critic was killed"

    said = capsys.readouterr().out
    found = re.findall(r"\[ppo\] role actor died in iteration (\d+) \(critic replica 0: (\w+)\); "
                       r"restarting from the checkpoint after iteration (\d+) \(failure 1/3\)", said)
    assert len(found) == 1, said[-3000:]
    died_in, error, resumed_after = int(found[0][0]), found[0][1], int(found[0][2])
    assert error in ("ActorDiedError", "RayActorError", "ActorUnavailableError")
    # An iteration logs its metrics before it writes its checkpoint, so the kill can land in the checkpoint
    # of the last iteration logged (then that checkpoint is incomplete and the one before it is used).
    assert died_in >= fault["logged"] and resumed_after == (died_in - 1) // 2 * 2 >= 2
    assert f"resuming after iteration {resumed_after}" in said
    restarts = [json.loads(x) for x in (out / RESTARTS).read_text().splitlines()]
    assert [(r["iteration"], r["checkpoint"], r["dead"]) for r in restarts] == [
        (died_in, resumed_after, ["critic replica 0"])]
    assert read_manifest(out)["metrics"]["role_restarts"] == 1
    assert read_manifest(reference)["metrics"]["role_restarts"] == 0
    _assert_same_run(out, reference)


def test_no_failures_allowed_fails_at_once(ray_local, tmp_path, tiny_rm, prompts):
    """`max_failures: 0`: a dead role actor ends the run with an error naming the limit and where to resume."""
    from almost_ray.rl.failures import RoleActorDied

    stage_dir = tmp_path / "strict" / "ppo"
    fault: dict = {}

    def kill_the_reward_actor():
        try:
            _wait_for(lambda: (stage_dir / "checkpoints" / "iter_0000002").is_dir(), 600, "the first checkpoint")
            os.kill(_wait_for(lambda: _alive_actors("RewardActor"), 60, "the reward actor")[0]["Pid"], signal.SIGKILL)
        except BaseException as err:
            fault["error"] = err

    killer = threading.Thread(target=kill_the_reward_actor, daemon=True)
    killer.start()
    with pytest.raises(RoleActorDied, match=r"ppo.max_failures=0 restarts are used up; run the command again to "
                                            r"resume from the checkpoint after iteration [24]"):
        run_ppo(_cfg(tiny_rm).model_copy(update={"max_failures": 0}), tmp_path / "strict", prompts)
    killer.join(timeout=60)
    assert "error" not in fault, fault.get("error")
    assert not (stage_dir / "manifest.json").exists() and not (stage_dir / RESTARTS).exists()


def test_a_killed_ppo_driver_resumes_after_its_last_checkpoint(ray_local, tmp_path, tiny_rm, prompts, reference):
    """`almost-ray ppo` (a driver joined to a running Ray, as a submitted job runs) SIGKILLed after its
    first checkpoint, then run again: it resumes after the latest checkpoint on disk, computes only the
    iterations after it, and its metrics and final weights equal the uninterrupted run's."""
    config = tmp_path / "ppo.yaml"
    config.write_text(yaml.safe_dump({"run_name": "killed", "runs_dir": str(tmp_path),
                                      "ppo": _cfg(tiny_rm).model_dump(mode="json")}))
    stage_dir = tmp_path / "killed" / "ppo"
    command = [sys.executable, "-m", "almost_ray.cli", "ppo", "--config", str(config), "--prompts", str(prompts)]
    env = _subprocess_env(ray_local.get_runtime_context().gcs_address)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_for(lambda: proc.poll() is not None or (
            (stage_dir / "metrics.jsonl").is_file() and len(_metrics(stage_dir)) >= 3), 600, "iteration 3")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        _kill_group(proc)
    assert proc.returncode == -signal.SIGKILL, "the driver ended before it was killed"
    checkpoint = latest_iteration(stage_dir)  # the driver is dead: nothing moves
    assert 2 <= checkpoint < ITERATIONS and checkpoint % 2 == 0
    assert not (stage_dir / "manifest.json").exists() and not (stage_dir / "model").exists()

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{ITERATIONS} iterations of 4 episodes, advantages: gae, resuming after iteration {checkpoint}" in again.stdout
    computed = [int(n) for n in re.findall(rf"\[ppo\] iteration (\d+)/{ITERATIONS} ", again.stdout)]
    assert computed == list(range(checkpoint + 1, ITERATIONS + 1))  # none before the checkpoint again
    assert "role actor died" not in again.stdout
    _assert_same_run(stage_dir, reference)
    assert read_manifest(stage_dir)["counts"] == read_manifest(reference)["counts"]
