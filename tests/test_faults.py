"""Fault tests (docs/reliability.md): a killed generator actor, a lost node, a killed driver, an output that
cannot be written, a killed RMSP reward-model replica and a killed eval scorer. Each compares record
counts and content hashes with an uninterrupted run of the same config and seed, not just that the
stage finished. They drive the stages' public `run` functions and the CLI only, so they hold whatever
pools the stages use inside. `make test-faults` runs them.

PPO (a killed role actor, a killed driver) is in tests/test_faults_ppo.py; the pipeline job killed and
submitted again in tests/test_faults_job.py.

A killed Ray Train worker is covered in tests/test_train_loop.py
(`test_two_worker_fsdp_run_with_a_dead_worker_equals_one_process`: metrics and weights equal a run
without the fault) and tests/test_train_slow.py (`test_a_restarted_run_resumes_from_its_latest_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from almost_ray.cli import main
from almost_ray.config import Config
from almost_ray.runs.manifest import read_manifest
from almost_ray.synth import compare

CLI = [sys.executable, "-m", "almost_ray.cli"]
TINY = {"ref": "tiny:llama", "dtype": "float32", "max_batch_size": 2}
QUERIES = [f"Question number {i}: how would you explain topic {i} to a child?" for i in range(12)]
SHARD_SIZE = 2
ROWS = 2 * len(QUERIES)  # two rungs answer every query, in one pool (they share the model)


def _compare_raw(tmp_path: Path, run_name: str, concurrency: int = 2) -> dict:
    """A 2-rung ladder on tiny:llama, 12 queries, a pool of `concurrency` replicas, 2-row shards."""
    queries = tmp_path / "queries.jsonl"
    if not queries.exists():
        queries.write_text("".join(json.dumps({"id": f"q{i:02d}", "text": t}) + "\n" for i, t in enumerate(QUERIES)))
    res = {"concurrency": concurrency, "num_cpus": 1, "batch_size": 2}
    sampling = {"max_new_tokens": 24, "seed": 7}
    return {
        "run_name": run_name, "runs_dir": str(tmp_path / "runs"), "ray": {"num_cpus": 2},
        "compare": {
            "queries": str(queries), "shard_size": SHARD_SIZE,
            "ladder": [
                {"name": "hhh-2", "model": TINY, "prompt": "hhh", "shots": 2, "sampling": sampling, "resources": res},
                {"name": "hhh-1", "model": TINY, "prompt": "hhh", "shots": 1, "sampling": sampling, "resources": res},
            ],
            # random weights write no sentences: keep only the length rule
            "heuristic_filter": {"min_chars": 0, "required_endings": [], "bad_endings": [], "bad_starts": [],
                                 "bad_patterns": []},
        },
    }


def _outputs(stage: Path) -> dict[str, tuple[int, str]]:
    """(lines, sha256) of each data file of a finished compare stage."""
    found = {}
    for name in ("responses.jsonl", "comparisons.jsonl"):
        data = (stage / name).read_bytes()
        found[name] = (data.count(b"\n"), hashlib.sha256(data).hexdigest())
    return found


def _run_compare(raw: dict) -> Path:
    return compare.run(Config.model_validate(raw))


def _finished_shards(stage: Path) -> list[Path]:
    """Shard files of the pool now running (`shards.ShardedJsonl` keeps them in `.<part>.shards/`)."""
    return sorted(stage.glob("parts/.*.shards/shard-*.jsonl"))


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _generator_actors(node_id: str | None = None) -> list[dict]:
    """Alive Ray Data pool actors of the connected cluster: Ray Data names each pool's actor class
    `MapWorker(<operator>)`, a subclass of its `_MapWorker`.

    `ray.util.state.list_actors` needs the dashboard, which tests do not start; the GCS actor table
    (`ray._private.state.actors`) holds the same records."""
    import ray

    actors = ray._private.state.actors().values()
    return [a for a in actors if a["ActorClassName"].startswith(("MapWorker(", "_MapWorker"))
            and a["State"] == "ALIVE" and (node_id is None or a["Address"]["NodeID"] == node_id)]


def _assert_mid_stage(at_fault: int) -> None:
    """The fault hit a pool with some but not all of its shards written."""
    assert 1 <= at_fault < ROWS // SHARD_SIZE, f"fault after {at_fault} of {ROWS // SHARD_SIZE} shards"


@pytest.mark.faults
@pytest.mark.slow
def test_compare_survives_a_killed_generator_actor(tmp_path, ray_local):
    """SIGKILL one replica of the generator pool once shards exist: Ray Data restarts the actor and
    retries its tasks (actor pools default to max_restarts=-1, max_task_retries=-1), and the stage's
    outputs equal the uninterrupted run's byte for byte (sampling is seeded per prompt)."""
    ref = _outputs(_run_compare(_compare_raw(tmp_path, "ref")))
    assert ref["responses.jsonl"][0] == ROWS

    raw = _compare_raw(tmp_path, "killed")
    stage = Config.model_validate(raw).run_dir / "compare"
    fault: dict = {}

    def kill_one_replica():
        try:
            fault["shards"] = len(_wait_for(lambda: _finished_shards(stage), 600, "a first shard"))
            actors = _wait_for(_generator_actors, 60, "the pool's actors")
            os.kill(actors[0]["Pid"], signal.SIGKILL)
            fault["actor"] = actors[0]["ActorID"]
        except BaseException as err:  # reported by the main thread
            fault["error"] = err

    killer = threading.Thread(target=kill_one_replica, daemon=True)
    killer.start()
    _run_compare(raw)
    killer.join(timeout=60)
    assert "error" not in fault, fault.get("error")
    _assert_mid_stage(fault["shards"])
    import ray

    assert ray._private.state.actors(fault["actor"])["NumRestarts"] >= 1  # Ray Data restarted it
    assert _outputs(stage) == ref
    assert read_manifest(stage)["counts"]["responses"] == {"hhh-2": len(QUERIES), "hhh-1": len(QUERIES)}


@pytest.mark.faults
@pytest.mark.slow
def test_compare_survives_a_lost_node(tmp_path):
    """A 3-node cluster (head 1 CPU, two workers of 1 CPU); the 2-replica pool runs on at least one
    worker; that worker is removed while the stage runs (shards remain, no manifest yet), its replica is
    restarted on another node (the actor table shows a restart and its new node), and the outputs equal
    an uninterrupted run's."""
    import ray
    from ray.cluster_utils import Cluster

    ref_stage = None
    had_ray = ray.is_initialized()
    if had_ray:
        ray.shutdown()  # a session's local Ray (the ray_local fixture); restored below
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        ref_stage = _run_compare(_compare_raw(tmp_path, "ref"))
        ref = _outputs(ref_stage)

        raw = _compare_raw(tmp_path, "lost-node")
        stage = Config.model_validate(raw).run_dir / "compare"
        fault: dict = {}

        def remove_a_busy_worker():
            try:
                fault["shards"] = len(_wait_for(lambda: _finished_shards(stage), 600, "a first shard"))
                busy = [w for w in workers if _generator_actors(w.node_id)]
                assert busy, "no generator replica on a worker node"
                on_node = _generator_actors(busy[0].node_id)
                fault.update(replicas_on_node=len(on_node), actors=[a["ActorID"] for a in on_node],
                             node=busy[0].node_id, running=not (stage / "manifest.json").exists())
                cluster.remove_node(busy[0], allow_graceful=False)
            except BaseException as err:
                fault["error"] = err

        remover = threading.Thread(target=remove_a_busy_worker, daemon=True)
        remover.start()
        _run_compare(raw)
        remover.join(timeout=120)
        assert "error" not in fault, fault.get("error")
        _assert_mid_stage(fault["shards"])
        assert fault["replicas_on_node"] >= 1 and fault["running"], "the node went after the stage ended"
        moved = [ray._private.state.actors(a) for a in fault["actors"]]
        assert all(a["NumRestarts"] >= 1 and a["Address"]["NodeID"] != fault["node"] for a in moved), moved
        assert _outputs(stage) == ref
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had_ray:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)


def _subprocess_env(ray_address: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    """End whatever the CLI process started (it runs in its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.faults
@pytest.mark.slow
def test_a_killed_compare_driver_resumes_from_its_finished_shards(tmp_path, ray_local):
    """`almost-ray compare`, a driver joined to a running Ray (RAY_ADDRESS, as `ray job submit` runs it),
    SIGKILLed once a shard file exists, then run again: the finished shards are not generated again
    (the manifest's `generated` count) and the outputs equal an uninterrupted run's byte for byte."""
    ref_stage = _run_compare(_compare_raw(tmp_path, "ref"))
    ref = _outputs(ref_stage)

    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(_compare_raw(tmp_path, "killed")))
    stage = tmp_path / "runs" / "killed" / "compare"
    command = [*CLI, "compare", "--config", str(cfg_path)]
    env = _subprocess_env(ray_local.get_runtime_context().gcs_address)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_for(lambda: _finished_shards(stage) or proc.poll() is not None, 600, "a first shard")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        _kill_group(proc)
    assert proc.returncode == -signal.SIGKILL, "the driver ended before it was killed"
    done = _finished_shards(stage)  # the driver is dead: nothing moves
    _assert_mid_stage(len(done))
    assert not (stage / "manifest.json").exists() and not (stage / "comparisons.jsonl").exists()

    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=600)
    finally:
        _kill_group(proc)
    assert proc.returncode == 0, err[-3000:]
    pools = read_manifest(stage)["metrics"]["pools"]
    assert list(pools) == ["hhh-2+hhh-1"]
    assert pools["hhh-2+hhh-1"]["rows"] == ROWS
    assert pools["hhh-2+hhh-1"]["generated"] == ROWS - SHARD_SIZE * len(done)  # finished shards kept
    assert _outputs(stage) == ref
    assert read_manifest(stage)["counts"] == read_manifest(ref_stage)["counts"]


@pytest.mark.faults
def test_an_output_under_a_file_is_a_clear_error(tmp_path, capsys):
    """An output path whose parent is a regular file (ENOTDIR; chmod does not stop root): exit 1 with
    the path named, no traceback, nothing written beside it."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello?\n")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file\n")
    output = blocker / "stage" / "responses.jsonl"
    code = main(["generate", "--input", str(prompts), "--output", str(output),
                 "--set", "generate.model.ref=tiny:llama"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"almost-ray: error: cannot write {blocker}/stage") and "Not a directory" in err
    assert blocker.read_text() == "a file\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "not-a-dir", "prompts.txt"]


def _limit_file_size(limit: int):
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.mark.faults
@pytest.mark.slow
def test_a_full_disk_leaves_the_previous_outputs_intact(tmp_path):
    """`train-rm` (num_workers 0: no Ray) runs once; a second run with another learning rate writes its
    model under RLIMIT_FSIZE = 1 MiB (writes past it fail with EFBIG, as on a full disk): exit 1 with
    the path named, and the first run's manifest, model and plot are byte for byte as they were."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"A careful answer {i}.",
                                         "rejected": "no"}) + "\n" for i in range(8)))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"run_name": "t", "runs_dir": str(tmp_path / "runs"), "train_rm": {
        "model": "tiny:llama", "num_workers": 0, "max_steps": 2, "global_batch_size": 4,
        "micro_batch_size": 4, "max_length": 32}}))
    stage = tmp_path / "runs" / "t" / "rm"
    first = subprocess.run([*CLI, "train-rm", "--config", str(cfg), "--input", str(pairs)], env=_subprocess_env(),
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    kept = ["manifest.json", "training.png", *(f"model/{p.name}" for p in (stage / "model").iterdir())]
    before = {name: (stage / name).read_bytes() for name in kept}
    assert len(before["model/model.safetensors"]) > 1 << 20

    second = subprocess.run([*CLI, "train-rm", "--config", str(cfg), "--input", str(pairs),
                             "--set", "train_rm.lr=2e-5"], env=_subprocess_env(), capture_output=True,
                            text=True, timeout=600, preexec_fn=_limit_file_size(1 << 20))
    assert second.returncode == 1, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    assert f"almost-ray: error: cannot write {stage}/.model." in second.stderr
    assert "File too large" in second.stderr
    assert {name: (stage / name).read_bytes() for name in kept} == before
    assert sorted(p.name for p in (stage / "model").iterdir()) == sorted(n[6:] for n in kept if n.startswith("model/"))
    assert not list(stage.glob(".model.*"))  # the half-written model was removed


def _alive_actors(class_name: str) -> list[dict]:
    """Alive actors of one class in the connected cluster's actor table (see `_generator_actors`)."""
    import ray

    return [a for a in ray._private.state.actors().values()
            if a["ActorClassName"] == class_name and a["State"] == "ALIVE"]


def _kill_when(ready, actors, fault: dict, timeout: float = 600) -> threading.Thread:
    """A thread that SIGKILLs the first of `actors()` once `ready()` returns something truthy (kept in
    `fault["at"]`); errors go to the main thread in `fault["error"]`."""

    def kill():
        try:
            fault["at"] = _wait_for(ready, timeout, "the moment to kill")
            actor = _wait_for(actors, 60, "an alive actor to kill")[0]
            os.kill(actor["Pid"], signal.SIGKILL)
            fault["actor"] = actor["ActorID"]
        except BaseException as err:  # reported by the main thread
            fault["error"] = err

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


RMSP_QUERIES = [f"How would you explain topic number {i} to a friend?" for i in range(8)]



def _rmsp(tmp_path: Path, tiny_rm: Path, run_name: str) -> Path:
    """RMSP on tiny:llama: 8 queries, best-of-3 scored by one RM replica, 2 turns, one dialogue per shard."""
    from almost_ray.config import load_config
    from almost_ray.rmsp import stage as rmsp

    queries = tmp_path / "rmsp-queries.txt"
    queries.write_text("\n".join(RMSP_QUERIES) + "\n")
    pools = [f"rmsp.{r}.resources.{k}={v}" for r in ("assistant", "user", "reward_model")
             for k, v in (("num_cpus", 0.1), ("batch_size", 2))]
    cfg = load_config(None, [
        f"runs_dir={tmp_path / 'runs'}", f"run_name={run_name}", f"rmsp.queries={queries}", "rmsp.shard_size=1",
        "rmsp.best_of=3", f"rmsp.reward_model.ref={tiny_rm}", "rmsp.max_turns=2",
        "rmsp.assistant.model.ref=tiny:llama", "rmsp.user.model.ref=tiny:llama", "rmsp.assistant.shots=1",
        "rmsp.user.shots=1", "rmsp.assistant.sampling.max_new_tokens=8", "rmsp.user.sampling.max_new_tokens=6",
        *pools,
    ])
    return rmsp.run(cfg)


def _file_hashes(stage: Path, names: tuple[str, ...]) -> dict[str, tuple[int, str]]:
    found = {}
    for name in names:
        data = (stage / name).read_bytes()
        found[name] = (data.count(b"\n"), hashlib.sha256(data).hexdigest())
    return found


@pytest.mark.faults
@pytest.mark.slow
def test_rmsp_survives_a_killed_reward_model_replica(tmp_path, ray_local, tiny_rm):
    """SIGKILL the RMSP reward-model replica (a `replicas.ReplicaSet` actor, `RmspRewardModelReplica`)
    once the first dialogue is on disk: Ray restarts it (max_restarts=-1), the batches queued on it are
    retried (max_task_retries=-1), and dialogues.jsonl / dropped.jsonl equal the uninterrupted run's."""
    names = ("dialogues.jsonl", "dropped.jsonl")
    ref_stage = _rmsp(tmp_path, tiny_rm, "ref")
    ref = _file_hashes(ref_stage, names)
    assert ref["dialogues.jsonl"][0] + ref["dropped.jsonl"][0] == len(RMSP_QUERIES)

    stage = tmp_path / "runs" / "killed" / "rmsp"
    fault: dict = {}
    killer = _kill_when(lambda: len(list(stage.glob(".selfplay-*.jsonl.shards/shard-*.jsonl"))),
                        lambda: _alive_actors("RmspRewardModelReplica"), fault)
    _rmsp(tmp_path, tiny_rm, "killed")
    killer.join(timeout=60)
    assert "error" not in fault, fault.get("error")
    assert 1 <= fault["at"] < len(RMSP_QUERIES), f"killed after {fault['at']} of {len(RMSP_QUERIES)} dialogues"
    import ray

    assert ray._private.state.actors(fault["actor"])["NumRestarts"] >= 1  # Ray restarted the replica
    assert _file_hashes(stage, names) == ref
    assert read_manifest(stage)["counts"] == read_manifest(ref_stage)["counts"]


# Long enough that the pool still has seconds of work when the first shard lands (24 short rows took the
# tiny model ~0.4 s in all: the kill could come after the last batch, when nothing is left to restart).
EVAL_ROWS = [{"key": f"{i:03d}", "context": f"\n\nHuman: Question {i}: {'which answer is right? ' * 60}\n\nAssistant: Answer",
              "continuations": [" A", " B", f" C is right for {i}", " none of them"]} for i in range(320)]
EVAL_SHARD = 8


@pytest.mark.faults
@pytest.mark.slow
def test_eval_scoring_survives_a_killed_scorer_replica(tmp_path, ray_local):
    """The eval scorer (`eval.scoring.score_on_ray`: a Ray Data pool of 2 `ScorerReplica`s, 320 rows in
    batches of 2, shards of 8): one replica SIGKILLed once a shard is on disk; Ray Data restarts it and
    retries its batch, and the scores file equals the uninterrupted run's byte for byte."""
    from almost_ray.cluster.config import ResourcesConfig
    from almost_ray.eval.scoring import score_on_ray, scores_path
    from almost_ray.models.config import ModelConfig

    model = ModelConfig(ref="tiny:llama", dtype="float32", max_batch_size=2)
    res = ResourcesConfig(concurrency=2, num_cpus=1, batch_size=2)
    score_on_ray(model, res, tmp_path / "ref", shard_size=EVAL_SHARD)(EVAL_ROWS, "hhh")
    ref_file = scores_path(tmp_path / "ref", "hhh", model, EVAL_ROWS)
    ref = _file_hashes(ref_file.parent, (ref_file.name,))
    assert ref[ref_file.name][0] == len(EVAL_ROWS)

    work = tmp_path / "killed"
    final = scores_path(work, "hhh", model, EVAL_ROWS)
    shards = work / f".{final.name}.shards"
    fault: dict = {}

    killer = _kill_when(lambda: len(list(shards.glob("shard-*.jsonl"))), _generator_actors, fault)  # its only pool
    score_on_ray(model, res, work, shard_size=EVAL_SHARD)(EVAL_ROWS, "hhh")
    killer.join(timeout=60)
    assert "error" not in fault, fault.get("error")
    assert 1 <= fault["at"] < len(EVAL_ROWS) // EVAL_SHARD, f"killed after {fault['at']} of {len(EVAL_ROWS) // EVAL_SHARD} shards"
    import ray

    assert ray._private.state.actors(fault["actor"])["NumRestarts"] >= 1  # Ray Data restarted the replica
    assert _file_hashes(work, (final.name,)) == {final.name: ref[ref_file.name]}
