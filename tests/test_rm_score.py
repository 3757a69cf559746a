"""The rm_score stage's inputs, checked before Ray: which prompts it asks (the queries of train_rm's held-out
comparisons, each once), which models it scores, and what each training input also held."""

from __future__ import annotations

import json

import pytest

from almost_ray.config import Config
from almost_ray.config_base import ConfigError
from almost_ray.data.records import RecordError, write_jsonl
from almost_ray.eval import rm_score


def comparison(query_id: str, prompt: str) -> dict:
    return {"prompt": prompt, "chosen": "A good answer.", "rejected": "No.", "query_id": query_id}


def held_out(tmp_path) -> Config:
    cfg = Config.model_validate({"runs_dir": str(tmp_path / "runs"), "run_name": "r",
                                 "train_rm": {"heldout_fraction": 0.1}})
    write_jsonl(cfg.run_dir / "rm" / "heldout_comparisons.jsonl",
                [comparison("q7", "Why is the sky blue?"), comparison("q7", "Why is the sky blue?"),
                 comparison("q2", "How do I boil an egg?"), comparison("q9", "What is a prime number?")])
    return cfg


def test_held_out_queries_are_asked_once_each_in_file_order(tmp_path):
    cfg = held_out(tmp_path)
    assert rm_score.prompts(cfg) == [("q7", "Why is the sky blue?"), ("q2", "How do I boil an egg?"),
                                     ("q9", "What is a prime number?")]
    limited = cfg.model_copy(update={"rm_score": cfg.rm_score.model_copy(update={"limit": 2})})
    assert [i for i, _ in rm_score.prompts(limited)] == ["q7", "q2"]
    # models that exist are inputs (a retrained one redoes the stage); the base model is a reference, not a path
    inputs = rm_score.STAGE.inputs(cfg)
    assert inputs["prompts"] == cfg.run_dir / "rm" / "heldout_comparisons.jsonl" and "model_sft" not in inputs
    (cfg.run_dir / "sft" / "model").mkdir(parents=True)
    (cfg.run_dir / "sft" / "model" / "config.json").write_text("{}")
    assert rm_score.STAGE.inputs(cfg)["model_sft"] == cfg.run_dir / "sft" / "model"


def test_what_training_saw_of_the_prompts_is_counted(tmp_path):
    cfg = held_out(tmp_path)
    write_jsonl(cfg.run_dir / "rmsp" / "dialogues.jsonl", [
        {"messages": [{"role": "user", "content": "How do I boil an egg?"}, {"role": "assistant", "content": "Boil it."}]}])
    texts = [t for _, t in rm_score.prompts(cfg)]
    assert rm_score.seen_in_training(cfg, texts) == {"ppo and ppo_grpo prompts": 1}  # no DPO model: not counted


def test_missing_or_absent_prompts_stop_before_ray_naming_the_field(tmp_path):
    cfg = Config.model_validate({"runs_dir": str(tmp_path / "runs"), "run_name": "r"})
    with pytest.raises(ConfigError, match="rm_score.prompts: no held-out prompts: set train_rm.heldout_fraction"):
        rm_score.check(cfg)
    cfg = Config.model_validate({"runs_dir": str(tmp_path / "runs"), "run_name": "r",
                                 "train_rm": {"heldout_fraction": 0.1}})
    with pytest.raises(RecordError, match=r"rm_score.prompts: .*heldout_comparisons.jsonl: file not found \(run "
                                          r"`almost-ray train-rm` first"):
        rm_score.check(cfg)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "no prompt field"}) + "\n")
    cfg = cfg.model_copy(update={"rm_score": cfg.rm_score.model_copy(update={"prompts": str(bad)})})
    with pytest.raises(RecordError, match=f"{bad}:1: expected one of the fields 'messages', 'prompt', 'text'"):
        rm_score.check(cfg)
