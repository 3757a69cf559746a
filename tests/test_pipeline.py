"""The pipeline's stage graph: order, selection, input checks, skip-when-done and summaries; the jobs entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_pipeline_config

from almost_ray.cli import main
from almost_ray.config import load_config
from almost_ray.config_base import ConfigError
from almost_ray.data.preferences import is_heldout, split_by_query
from almost_ray.pipeline.loop import PIPELINE as STAGES
from almost_ray.pipeline.loop import check_inputs, select
from almost_ray.pipeline.stages import OPTIONAL
from almost_ray.runs.manifest import flatten, summary, summary_line

REPO = Path(__file__).resolve().parents[1]
ORDER = ["queries", "compare", "train_rm", "eval_rm", "rmsp", "train_sft", "ppo", "eval", "report"]


def names(stages) -> list[str]:
    return [s.name for s in stages]


def tiny_config(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_pipeline_config(tmp_path)))
    return path


def test_stages_in_pipeline_order():
    assert names(STAGES) == ORDER


def test_selection_by_from_until_and_only():
    assert names(select(STAGES)) == ORDER
    assert names(select(STAGES, until="train_sft")) == ORDER[:6]
    assert names(select(STAGES, start="eval")) == ["eval", "report"]
    assert names(select(STAGES, start="compare", until="eval_rm")) == ["compare", "train_rm", "eval_rm"]
    assert names(select(STAGES, only="report, queries")) == ["queries", "report"]  # pipeline order, not given order
    with pytest.raises(ConfigError, match="--from: unknown stage 'sft'; the stages are queries, compare"):
        select(STAGES, start="sft")
    with pytest.raises(ConfigError, match="--only: unknown stage 'bogus'"):
        select(STAGES, only="queries,bogus")
    with pytest.raises(ConfigError, match="either --only or --from/--until"):
        select(STAGES, start="queries", only="report")
    with pytest.raises(ConfigError, match="--from eval comes after --until rmsp"):
        select(STAGES, start="eval", until="rmsp")


def test_unknown_stage_exits_2_with_the_stage_list(capsys):
    assert main(["pipeline", "--only", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown stage 'bogus'" in err and "queries, compare, train_rm, eval_rm, rmsp" in err


def test_missing_input_stops_before_ray_naming_the_stage_that_writes_it(tmp_path, capsys):
    assert main(["pipeline", "--config", str(tiny_config(tmp_path)), "--only", "train_sft"]) == 2
    err = capsys.readouterr().err
    assert f"stage train_sft: input dialogues not found: {tmp_path}/runs/tiny/rmsp/dialogues.jsonl" in err
    assert "(run stage rmsp first)" in err
    # inputs written by an earlier selected stage are fine; the first stage's missing seeds file is not
    check_inputs(select(STAGES), load_config(tiny_config(tmp_path)))
    cfg = load_config(tiny_config(tmp_path), [f"queries.seeds={tmp_path}/none.txt"])
    with pytest.raises(ConfigError, match="stage queries: input seeds not found: .*none.txt \\(check the config\\)"):
        check_inputs(select(STAGES), cfg)


def test_list_shows_each_stage_and_its_outputs(tmp_path, capsys):
    assert main(["pipeline", "--config", str(tiny_config(tmp_path)), "--list"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if not line.startswith(" ")]
    assert [n for n in listed if n not in OPTIONAL] == ORDER
    assert out.count("to run") == 9
    assert "train_dpo  optional (--with train_dpo)" in out and f"{tmp_path}/runs/tiny/ppo_grpo/model" in out
    assert f"{tmp_path}/runs/tiny/rm/heldout_comparisons.jsonl" in out
    assert main(["pipeline", "--config", str(tiny_config(tmp_path)), "--list", "--with", "ppo_grpo"]) == 0
    assert capsys.readouterr().out.count("to run") == 10


def test_with_adds_optional_stages_in_their_place_and_only_names_any_stage(tmp_path, capsys, monkeypatch):
    from almost_ray.pipeline import loop

    ran = []
    monkeypatch.setattr(loop, "run", lambda cfg, selected: ran.append((cfg.pipeline.extras, names(selected))) or {})
    config = str(tiny_config(tmp_path))
    assert main(["pipeline", "--config", config]) == 0
    assert main(["pipeline", "--config", config, "--with", "rm_score,train_dpo", "--from", "train_sft"]) == 0
    assert main(["pipeline", "--config", config, "--only", "ppo_grpo"]) == 0
    assert main(["pipeline", "--config", config, "--set", "pipeline.extras=[ppo_grpo]", "--from", "ppo"]) == 0
    assert ran == [([], ORDER),
                   (["rm_score", "train_dpo"], ["train_sft", "train_dpo", "ppo", "eval", "rm_score", "report"]),
                   ([], ["ppo_grpo"]),
                   (["ppo_grpo"], ["ppo", "ppo_grpo", "eval", "report"])]
    assert main(["pipeline", "--config", config, "--from", "ppo_grpo"]) == 2
    assert "--from: ppo_grpo is an optional stage: add --with ppo_grpo (pipeline.extras)" in capsys.readouterr().err
    assert main(["pipeline", "--config", config, "--with", "ppo_gae"]) == 2
    assert "pipeline.extras.0: Input should be 'train_dpo', 'ppo_grpo' or 'rm_score'" in capsys.readouterr().err


def test_summary_flattens_manifest_numbers_and_the_line_shows_headline_keys():
    manifest = {"stage": "rmsp", "wall_time_s": 12.5,
                "counts": {"queries": 4, "dialogues": 3, "complete_2_turn": 2, "max_turns": 2},
                "metrics": {"switches": {"mode": "rmsp"}, "per_turn": {"1": {"mean_chosen_reward": 0.25, "n": 3}}}}
    s = summary(manifest)
    assert s["counts"] == {"queries": 4, "dialogues": 3, "complete_2_turn": 2, "max_turns": 2}
    assert s["metrics"] == {"per_turn.1.mean_chosen_reward": 0.25, "per_turn.1.n": 3}
    rmsp = next(st for st in STAGES if st.name == "rmsp")
    assert summary_line(rmsp.headline, s) == "queries=4, dialogues=3, complete_2_turn=2, per_turn.1.mean_chosen_reward=0.25"
    assert flatten({"a": [1, 2], "b": None, "c": {"d": True}}) == {"c.d": True}


def test_held_out_split_is_by_query_stable_and_sized(tmp_path):
    rows = [{"prompt": f"query {q}", "chosen": f"good {k}", "rejected": f"bad {k}"} for q in range(200) for k in range(3)]
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    n_train, n_held = split_by_query(src, 0.1, tmp_path / "train.jsonl", tmp_path / "held.jsonl")
    assert n_train + n_held == 600 and 30 <= n_held <= 90 and n_held % 3 == 0
    held = {json.loads(x)["prompt"] for x in (tmp_path / "held.jsonl").read_text().splitlines()}
    train = {json.loads(x)["prompt"] for x in (tmp_path / "train.jsonl").read_text().splitlines()}
    assert not held & train  # every pair of a query lands on the same side
    assert held == {r["prompt"] for r in rows if is_heldout([{"role": "user", "content": r["prompt"]}], 0.1)}
    assert split_by_query(src, 0.0, tmp_path / "a.jsonl", tmp_path / "b.jsonl") == (600, 0)


def test_queries_stage_runs_then_is_skipped_when_done(tmp_path, ray_local, capsys):
    path = tiny_config(tmp_path)
    assert main(["pipeline", "--config", str(path), "--only", "queries"]) == 0
    out = capsys.readouterr().out
    assert "=== [1/1] queries: Self-Instruct query mining" in out
    assert "queries: done in" in out and "kept=4" in out
    manifest = tmp_path / "runs" / "tiny" / "queries" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    mem = json.loads(manifest.read_text())["memory"]  # both processes loaded torch and a model
    assert mem["driver_peak_mib"] > 50 and mem["driver_window"] == "stage"
    assert mem["actors_peak_mib"]["actors"] == 1 and mem["actors_peak_mib"]["by_role"]["queries"] > 50
    assert main(["pipeline", "--config", str(path), "--only", "queries"]) == 0
    out = capsys.readouterr().out
    assert "queries: skipped (done; it took" in out and "kept=4" in out
    assert manifest.stat().st_mtime_ns == stamp
    assert not list((tmp_path / "runs" / ".visibility").glob("*.token"))  # the check cleans up its token


def test_runs_dir_visibility_check_names_the_nodes_that_cannot_read_the_token():
    from almost_ray.cluster.connect import invisible_nodes

    answers = {"aaa": ("10.0.0.1", "tok"), "bbb": ("10.0.0.2", None), "ccc": None}
    assert invisible_nodes(answers, "tok") == ["bbb (10.0.0.2)", "ccc (no answer within 60 s)"]


def run_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "rlsf.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_job_entry_point_takes_the_pipeline_flags_and_exits_2_on_config_errors(tmp_path):
    help_text = run_job("--help")
    assert help_text.returncode == 0
    for flag in ("--config", "--set", "--from", "--until", "--only", "--list"):
        assert flag in help_text.stdout
    bad = run_job("--config", str(tiny_config(tmp_path)), "--only", "nope")
    assert bad.returncode == 2 and "unknown stage 'nope'" in bad.stderr
    missing = run_job("--config", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 2 and "config file not found" in missing.stderr
    listed = run_job("--config", str(tiny_config(tmp_path)), "--list")
    assert listed.returncode == 0 and listed.stdout.splitlines()[0].startswith("queries")


def test_a_trained_model_folder_is_an_input_not_a_dataset(tmp_path):
    """`--only eval,report` after `--until train_sft`: the SFT model's folder is an input (hashed for the
    manifest), not data to be read, so its presence is all the check asks of it."""
    cfg = load_config(tiny_config(tmp_path))
    model = tmp_path / "runs" / "tiny" / "sft" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    selected = select(STAGES, only="eval,report")
    assert "model_sft" in selected[0].inputs(cfg)
    check_inputs(selected, cfg)
