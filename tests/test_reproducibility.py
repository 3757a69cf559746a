"""Reproducibility: manifests record seeds, versions and the config hash, and the
deterministic stages give byte-identical outputs when run twice with the same config and seed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from almost_ray.config import Config
from almost_ray.config_base import config_hash
from almost_ray.runs.manifest import build_manifest, read_manifest, write_manifest
from almost_ray.synth.config import CompareConfig, QueriesConfig
from almost_ray.train.config import TrainRMConfig

TINY = {"ref": "tiny:llama", "dtype": "float32", "max_batch_size": 4}


@pytest.mark.parametrize("stage, section, seeds", [
    ("queries", QueriesConfig(seed=3, sampling={"seed": 4}), {"seed": 3, "sampling.seed": 4}),
    ("compare", CompareConfig(ladder=[{"name": "a", "sampling": {"seed": 5}}, {"name": "b"}]),
     {"ladder.0.sampling.seed": 5, "ladder.1.sampling.seed": 0}),
    ("train-rm", TrainRMConfig(seed=11), {"seed": 11}),
])
def test_every_manifest_records_seeds_versions_and_config_hash(tmp_path, stage, section, seeds):
    manifest = build_manifest(stage, section, {}, time.time(), counts={"rows": 0})
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    assert manifest["seeds"] == seeds
    assert manifest["config_hash"] == config_hash(section)
    assert {"almost-ray", "torch", "transformers", "ray"} <= set(manifest["versions"])


def _bytes(stage: Path, names: list[str]) -> dict[str, bytes]:
    return {name: (stage / name).read_bytes() for name in names}


@pytest.mark.slow
def test_deterministic_stages_give_byte_identical_outputs(tmp_path, ray_local):
    """`queries`, `compare` and `train-rm` (num_workers 0, 2 steps of one pair), each run twice into two stage
    folders with the same config and seed: the data files and the model's safetensors are equal."""
    from almost_ray.synth import compare, queries
    from almost_ray.train import rm as reward

    res = {"concurrency": 2, "num_cpus": 1, "batch_size": 2}
    raw = {
        "queries": {"model": TINY, "resources": res, "target": 6, "prompts_per_round": 6, "max_rounds": 2,
                    "static_shots": 2, "dynamic_shots": 1, "seed": 5, "min_chars": 1, "end_chars": "",
                    "rouge_threshold": 1.0, "banned_words": [], "sampling": {"max_new_tokens": 16}},
        "compare": {"shard_size": 3, "heuristic_filter": {"min_chars": 0, "required_endings": [], "bad_endings": [],
                                                         "bad_starts": [], "bad_patterns": []},
                    "ladder": [{"name": n, "model": TINY, "prompt": "hhh", "shots": s, "resources": res,
                                "sampling": {"max_new_tokens": 12, "seed": 9}} for n, s in (("a", 2), ("b", 1))]},
        "train_rm": {"model": "tiny:llama", "num_workers": 0, "epochs": 2, "max_steps": 2, "global_batch_size": 1,
                     "micro_batch_size": 1, "max_length": 48, "seed": 13},
    }
    for run in ("one", "two"):
        cfg = Config.model_validate({**raw, "runs_dir": str(tmp_path), "run_name": run})
        queries.run(cfg)
        compare.run(cfg)
        reward.run(cfg)

    mined = [json.loads(line) for line in (tmp_path / "one" / "queries" / "queries.jsonl").read_text().splitlines()]
    assert len(mined) >= 4
    assert (tmp_path / "one" / "compare" / "comparisons.jsonl").read_text().count("\n") >= 1
    files = {"queries": ["queries.jsonl"], "compare": ["responses.jsonl", "comparisons.jsonl"],
             "rm": ["model/model.safetensors", "model/config.json", "metrics.jsonl"]}
    for stage, names in files.items():
        one, two = tmp_path / "one" / stage, tmp_path / "two" / stage
        if stage == "rm":  # step times differ; the training record does not
            drop = ("step_time_s", "samples_per_s")
            metrics = [[{k: v for k, v in json.loads(line).items() if k not in drop}
                        for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
            assert metrics[0] == metrics[1] and len(metrics[0]) == 2
            names = names[:2]
        assert _bytes(one, names) == _bytes(two, names), stage
        m1, m2 = read_manifest(one), read_manifest(two)
        assert m1["seeds"] == m2["seeds"] and m1["seeds"]
        assert (m1["config_hash"], m1["inputs"], m1["counts"]) == (m2["config_hash"], m2["inputs"], m2["counts"])
