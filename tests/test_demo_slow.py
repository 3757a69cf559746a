"""`make demo` end to end: every stage feeds the next, on tiny:llama (slow: `make test-slow`)."""

from __future__ import annotations

import json

import pytest
import yaml

from almost_ray.cli import main
from almost_ray.manifest import read_manifest
from almost_ray.records import read_jsonl

pytestmark = pytest.mark.slow

TINY = {"ref": "tiny:llama", "dtype": "float32", "max_batch_size": 4}
RES = {"concurrency": 1, "num_cpus": 1, "batch_size": 4}
SEEDS = ["How do I clean a cast iron pan?", "What is the tallest building in the world?",
         "Can you suggest a name for my new puppy?", "Why do leaves change colour in autumn?",
         "How long should I boil an egg?", "What are some tips for a first marathon?"]


def _config(tmp_path) -> dict:
    (tmp_path / "seeds.txt").write_text("\n".join(SEEDS) + "\n")
    rung = {"model": TINY, "sampling": {"max_new_tokens": 8}, "resources": RES}
    role = {"model": TINY, "shots": 1, "sampling": {"max_new_tokens": 6},
            "resources": {**RES, "num_cpus": 0.3}}
    trainer = {"model": "tiny:llama", "num_workers": 0, "global_batch_size": 4, "micro_batch_size": 4,
               "max_length": 64, "epochs": 1}
    return {
        "run_name": "demo", "runs_dir": str(tmp_path / "runs"),
        "generate": {"model": TINY, "sampling": {"temperature": 0, "max_new_tokens": 6}, "resources": RES},
        "demo": {"seed_queries": str(tmp_path / "seeds.txt"), "num_queries": 3},
        "queries": {"seeds": str(tmp_path / "seeds.txt"), "target": 4, "prompts_per_round": 4, "max_rounds": 6,
                    "static_shots": 3, "dynamic_shots": 1, "min_chars": 1, "end_chars": "", "banned_words": [],
                    "rouge_threshold": 0.9, "shard_size": 2, "model": TINY, "sampling": {"max_new_tokens": 16},
                    "resources": RES},
        "compare": {
            "shard_size": 4, "trim_to_sentence": False,
            "ladder": [{"name": "hhh-2", "prompt": "hhh", "shots": 2, **rung},
                       {"name": "hhh-1-l1", "prompt": "hhh", "shots": 1, **rung,
                        "model": {**TINY, "num_layers": 1}}],
            "heuristic_filter": {"min_chars": 0, "required_endings": [], "bad_endings": [], "bad_starts": [],
                                 "bad_patterns": [], "length_rule": False},
        },
        "train_rm": trainer,
        "train_sft": trainer,
        "rmsp": {"best_of": 2, "shard_size": 2, "num_queries": 4, "assistant": role, "user": role,
                 "reward_model": {"resources": {**RES, "num_cpus": 0.3}}},
    }


def test_demo_runs_every_stage_into_the_next_and_resumes(tmp_path, ray_local, capsys):
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path)))
    assert main(["demo", "--config", str(path)]) == 0
    run = tmp_path / "runs" / "demo"
    for stage in ("queries", "compare", "rm", "rmsp", "sft"):
        assert read_manifest(run / stage) is not None, stage
    assert (run / "rm" / "model" / "model.safetensors").is_file()
    # RMSP used the RM the demo just trained, and SFT trained on RMSP's dialogues
    dialogues = list(read_jsonl(run / "rmsp" / "dialogues.jsonl"))
    assert dialogues and all(d["reward_model"] == str(run / "rm" / "model") for d in dialogues)
    assert read_manifest(run / "sft")["counts"]["dialogues"] == len(dialogues)
    answers = [json.loads(line) for line in (run / "answers" / "responses.jsonl").read_text().splitlines()]
    assert [a["query_id"] for a in answers] == ["seeds-1", "seeds-2", "seeds-3"]
    # the finetuned model is prompted in the format it was trained on
    assert all(a["prompt"].startswith("\n\nHuman: ") and a["generator"] == str(run / "sft" / "model") for a in answers)
    out = capsys.readouterr().out
    assert "1/6 queries" in out and "6/6 answers" in out and str(run / "sft" / "model") in out

    # a second run finds every stage done and skips it
    stamps = {s: (run / s / "manifest.json").stat().st_mtime_ns for s in ("queries", "compare", "rm", "rmsp", "sft")}
    assert main(["demo", "--config", str(path)]) == 0
    assert stamps == {s: (run / s / "manifest.json").stat().st_mtime_ns for s in stamps}
