"""RMSP end to end through Ray Data on tiny:llama: separate actor pools per role, the RM scoring in
context, outputs in TRL form, resume after a crash without duplicates, plain self-play."""

from __future__ import annotations

import json

import pytest

from almost_ray.config import load_config
from almost_ray.data.sources import read_rows
from almost_ray.rmsp import stage, turns
from almost_ray.runs.manifest import read_manifest

QUERIES = ["What is the capital of France?", "How do I boil an egg?", "What is a neural network?",
           "Why is the sky blue?", "How do plants grow?"]



def _cfg(tmp_path, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "q.txt").write_text("\n".join(QUERIES) + "\n")
    pools = [f"rmsp.{r}.resources.{k}={v}" for r in ("assistant", "user", "reward_model")
             for k, v in (("num_cpus", 0.1), ("batch_size", 2))]
    return load_config(None, [
        f"runs_dir={tmp_path}", f"rmsp.queries={tmp_path / 'q.txt'}", "rmsp.shard_size=1", "rmsp.best_of=3",
        "rmsp.assistant.model.ref=tiny:llama", "rmsp.user.model.ref=tiny:llama",
        "rmsp.assistant.shots=1", "rmsp.user.shots=1",
        "rmsp.assistant.sampling.max_new_tokens=6", "rmsp.user.sampling.max_new_tokens=6", *pools, *extra,
    ])


def test_rmsp_end_to_end_resumes_without_duplicates(ray_local, tmp_path, tiny_rm, monkeypatch):
    cfg = _cfg(tmp_path, f"rmsp.reward_model.ref={tiny_rm}")
    real_progress = stage._progress

    def crash_after_two(records, *args):
        for k, rec in enumerate(real_progress(records, *args)):
            if k == 2:
                raise KeyboardInterrupt("killed")
            yield rec

    monkeypatch.setattr(stage, "_progress", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        stage.run(cfg)
    stage_dir = cfg.run_dir / "rmsp"
    assert not (stage_dir / "manifest.json").exists()
    assert len(list(stage_dir.glob(".selfplay-*.shards/shard-*.jsonl"))) == 2  # two finished dialogues kept

    monkeypatch.setattr(stage, "_progress", real_progress)
    stage.run(cfg)
    metrics = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["of"] == 3  # the re-run did only the three unfinished dialogues

    records = [*read_rows(stage_dir / "dialogues.jsonl"), *read_rows(stage_dir / "dropped.jsonl")]
    assert sorted(r["id"] for r in records) == sorted(f"q-{i}" for i in range(1, 6))  # each query once
    from almost_ray.models.reward import RewardModel

    rm = RewardModel(str(tiny_rm), device="cpu")
    for rec in read_rows(stage_dir / "dialogues.jsonl"):
        roles = [m["role"] for m in rec["messages"]]
        assert roles == ["user", "assistant"] * rec["num_turns"] and 1 <= rec["num_turns"] <= 2
        assert (rec["mode"], rec["best_of"], rec["reward_model"]) == ("rmsp", 3, str(tiny_rm))
        for k, turn in enumerate(rec["assistant_turns"][: rec["num_turns"]]):
            context = rec["messages"][: 2 * k + 1]
            assert context[-1]["role"] == "user" and len(turn["scores"]) == 3
            # the RM scored each candidate as the next turn of this very conversation
            expected = rm.score([[*context, {"role": "assistant", "content": c}] for c in turn["candidates"]])
            assert turn["scores"] == pytest.approx(expected, abs=1e-4)
            usable = [r is None for r in turn["degenerate"]]
            assert turn["chosen"] == turns.best_of_n(turn["scores"], usable)
            assert rec["messages"][2 * k + 1]["content"] == turn["candidates"][turn["chosen"]].strip()

    manifest = read_manifest(stage_dir)
    assert manifest["counts"]["queries"] == 5
    assert manifest["counts"]["dialogues"] + manifest["counts"]["dropped"] == 5
    assert manifest["metrics"]["switches"]["mode"] == "rmsp"
    assert manifest["metrics"]["per_turn"]["1"]["mean_best_minus_mean"] >= 0
    finished = (stage_dir / "manifest.json").stat().st_mtime_ns
    stage.run(cfg)  # up to date: skipped
    assert (stage_dir / "manifest.json").stat().st_mtime_ns == finished


def test_plain_self_play_without_rm(ray_local, tmp_path):
    cfg = _cfg(tmp_path, "rmsp.reward_model=null", "rmsp.max_turns=1")
    stage.run(cfg)
    records = list(read_rows(cfg.run_dir / "rmsp" / "dialogues.jsonl"))
    assert records and all(r["mode"] == "self-play" and r["best_of"] == 1 and r["reward_model"] is None for r in records)
    for rec in records:
        (turn,) = rec["assistant_turns"]
        assert len(turn["candidates"]) == 1 and turn["scores"] is None and turn["chosen"] == 0
        assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]


@pytest.mark.slow
def test_roles_that_do_not_fit_together_take_turns_with_the_same_dialogues(ray_local, tmp_path, tiny_rm):
    """On 2 CPUs, 1.5-CPU role pools (the assistant's and the user's are one set) cannot all hold a
    replica at once: each role starts, answers a whole turn and is freed before the next (no stall),
    loading its model once per turn; roles that fit (0.1 CPU each) are started once per run. The
    dialogues are the same bytes either way."""
    dialogues, started = {}, {}
    for name, cpus in (("together", 0.1), ("in_turn", 1.5)):
        pools = [f"rmsp.{r}.resources.num_cpus={cpus}" for r in ("assistant", "user", "reward_model")]
        cfg = _cfg(tmp_path / name, f"rmsp.reward_model.ref={tiny_rm}", "rmsp.max_turns=2", *pools)
        stage.run(cfg)
        dialogues[name] = (cfg.run_dir / "rmsp" / "dialogues.jsonl").read_bytes()
        started[name] = read_manifest(cfg.run_dir / "rmsp")["metrics"]["replicas_started"]
    assert dialogues["together"] == dialogues["in_turn"]
    # the assistant and the user have the same model and resources: one set of replicas plays both
    assert started["together"] == {"assistant+user": 1, "reward_model": 1}
    assert started["in_turn"] == {"assistant+user": 3, "reward_model": 2}  # assistant, user, assistant


@pytest.mark.slow
def test_assistant_and_user_share_replicas_when_they_can_with_the_same_dialogues(ray_local, tmp_path, tiny_rm):
    """Same model and resources: one replica set plays both roles (one model load, one copy in memory);
    different resources: a set each. The dialogues are the same bytes, and the manifest says where the
    time and the memory went."""
    dialogues, manifests = {}, {}
    for name, user_cpus in (("shared", 0.1), ("separate", 0.15)):
        cfg = _cfg(tmp_path / name, f"rmsp.reward_model.ref={tiny_rm}", "rmsp.max_turns=2", "rmsp.num_queries=3",
                   f"rmsp.user.resources.num_cpus={user_cpus}")
        assert stage.shares_generator(cfg.rmsp) == (name == "shared")
        stage.run(cfg)
        dialogues[name] = (cfg.run_dir / "rmsp" / "dialogues.jsonl").read_bytes()
        manifests[name] = read_manifest(cfg.run_dir / "rmsp")
    assert dialogues["shared"] == dialogues["separate"]
    assert manifests["shared"]["metrics"]["replicas_started"] == {"assistant+user": 1, "reward_model": 1}
    assert manifests["separate"]["metrics"]["replicas_started"] == {"assistant": 1, "reward_model": 1, "user": 1}
    timing = manifests["shared"]["metrics"]["timing"]
    work = timing["replicas"]["assistant+user"]
    assert set(work) == {"assistant", "user"} and work["assistant"]["rows"] >= 3 and work["user"]["busy_s"] > 0
    assert work["assistant"]["load_s"] + work["user"]["load_s"] > 0 and timing["replicas"]["reward_model"]["all"]["busy_s"] > 0
    assert timing["selfplay_s"] > 0 and timing["roles_together"] is True and "write_s" in timing
    for name, roles in (("shared", {"rmsp.assistant", "rmsp.reward_model"}),
                        ("separate", {"rmsp.assistant", "rmsp.reward_model", "rmsp.user"})):
        mem = manifests[name]["memory"]["actors_peak_mib"]
        assert set(mem["by_role"]) == roles and mem["max"] > 50  # each actor loaded torch and a model
