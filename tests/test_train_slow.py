"""Slower training runs (`make test-slow`): a restarted process resumes, SFT on 2 workers equals one
process, and `almost-ray train-rm` trains the embedded model with 2 workers."""

from __future__ import annotations

import json
import random

import pytest
import torch
from test_train_loop import DiesAfterStep  # tests/ is on sys.path (no package)

from almost_ray.data.metrics_log import read_metrics
from almost_ray.data.preferences import load_pairs
from almost_ray.models.loading import resolve_model_dir
from almost_ray.train import loop, sft
from almost_ray.train import rm as reward
from almost_ray.train.config import TrainRMConfig, TrainSFTConfig

pytestmark = pytest.mark.slow


def _pairs(path, n, seed=0):
    from test_train_loop import planted_pairs  # tests/ is on sys.path (no package)

    planted_pairs(path, n, seed)


def _assert_same_run(ref_dir, run_dir, ref_metrics, run_metrics, model_cls):
    ref, run = read_metrics(ref_metrics), read_metrics(run_metrics)
    assert [r["step"] for r in run] == [r["step"] for r in ref]
    for a, b in zip(ref, run):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6), f"step {a['step']}"
    one, two = model_cls.from_pretrained(ref_dir).state_dict(), model_cls.from_pretrained(run_dir).state_dict()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=2e-5, msg=key)


def test_a_restarted_run_resumes_from_its_latest_checkpoint(tmp_path, ray_local):
    from ray.train import TrainingFailedError
    from transformers import AutoModelForSequenceClassification

    _pairs(tmp_path / "pairs.jsonl", 24, seed=3)
    model_dir = resolve_model_dir("tiny:llama")
    examples = reward.encode_pairs(load_pairs(tmp_path / "pairs.jsonl"), reward.load_tokenizer(model_dir), 48)
    base = dict(model="tiny:llama", epochs=2, global_batch_size=8, lr=1e-3, warmup_ratio=0.0, max_length=48,
                checkpoint_every=2, micro_batch_size=4)
    ref = loop.fit("rm", TrainRMConfig(**base, num_workers=0), examples, model_dir, tmp_path / "ref")
    cfg = TrainRMConfig(**base, num_workers=2, max_failures=0)
    with pytest.raises(TrainingFailedError):
        loop.fit(DiesAfterStep(3, per_step=1, marker=tmp_path / "died"), cfg, examples, model_dir, tmp_path / "run")
    assert (tmp_path / "died").is_file()
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    out = loop.fit("rm", cfg, examples, model_dir, tmp_path / "run")  # a new process would do the same
    _assert_same_run(ref, out, tmp_path / "ref" / "metrics.jsonl", tmp_path / "run" / "metrics.jsonl",
                     AutoModelForSequenceClassification)


def test_sft_on_two_workers_equals_one_process(tmp_path, ray_local):
    from transformers import AutoModelForCausalLM

    rng = random.Random(1)
    convs = []
    for _ in range(19):  # uneven lengths and a last global batch of 3
        q = " ".join(rng.choices(["tea", "river", "stone", "music", "paper"], k=rng.randint(2, 12)))
        convs.append([{"role": "user", "content": q},
                      {"role": "assistant", "content": " ".join(rng.choices(["yes", "green", "light"], k=rng.randint(1, 9)))}])
    model_dir = resolve_model_dir("tiny:llama")
    base = dict(model="tiny:llama", epochs=1, global_batch_size=8, lr=1e-3, warmup_ratio=0.0, max_length=64)
    examples = sft.encode_conversations(convs, sft.load_tokenizer(model_dir), TrainSFTConfig(**base))
    ref = loop.fit("sft", TrainSFTConfig(**base, num_workers=0, micro_batch_size=8), examples, model_dir,
                   tmp_path / "ref")
    run = loop.fit("sft", TrainSFTConfig(**base, num_workers=2, micro_batch_size=3), examples, model_dir,
                   tmp_path / "run")
    _assert_same_run(ref, run, tmp_path / "ref" / "metrics.jsonl", tmp_path / "run" / "metrics.jsonl",
                     AutoModelForCausalLM)


def test_train_rm_cli_on_the_embedded_model(tmp_path, ray_local):
    from almost_ray.cli import main
    from almost_ray.models.reward import RewardModel

    _pairs(tmp_path / "pairs.jsonl", 16)
    code = main(["train-rm", "-c", "configs/demo.yaml", "--input", str(tmp_path / "pairs.jsonl"),
                 "--output", str(tmp_path / "rm"), "--set", "train_rm.max_steps=2",
                 "--set", "train_rm.max_length=64", "--set", "train_rm.heldout_fraction=0"])
    assert code == 0
    rows = read_metrics(tmp_path / "rm" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["samples"] == 8 for r in rows)
    manifest = json.loads((tmp_path / "rm" / "manifest.json").read_text())
    assert manifest["config"]["num_workers"] == 2
    rm = RewardModel(str(tmp_path / "rm" / "model"), dtype="float32", device="cpu", max_length=64)
    assert len(rm.score([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]])) == 1
