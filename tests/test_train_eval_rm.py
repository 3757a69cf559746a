"""`almost-ray eval-rm`: pairwise accuracy and the prefer-longer baseline, through the real CLI."""

from __future__ import annotations

import json

import pytest

from almost_ray.data.preferences import PreferencePair
from almost_ray.eval.rm import length_baseline, pairwise_accuracy


def _pair(chosen: str, rejected: str) -> PreferencePair:
    user = {"role": "user", "content": "q"}
    return PreferencePair([user, {"role": "assistant", "content": chosen}],
                          [user, {"role": "assistant", "content": rejected}])


def test_pairwise_accuracy_counts_ties_as_half():
    assert pairwise_accuracy([1.0, 2.0, 0.0, 5.0], [0.0, 3.0, 0.0, 1.0]) == pytest.approx(2.5 / 4)
    with pytest.raises(ValueError):
        pairwise_accuracy([], [])


def test_length_baseline_prefers_the_longer_reply():
    pairs = [_pair("a long answer", "short"), _pair("no", "a longer one"), _pair("same", "size")]
    assert length_baseline(pairs) == pytest.approx(1.5 / 3)


def test_eval_rm_cli_reports_rm_and_length_baseline(tmp_path, ray_local, shared_data, capsys, tiny_rm):
    from almost_ray.cli import main

    hh = shared_data / "hh_helpful_base_test_500.jsonl"
    comparisons = tmp_path / "c.jsonl"
    comparisons.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": "A full, careful answer.",
                                               "rejected": "No."}) + "\n" for i in range(6)))
    out = tmp_path / "eval_rm" / "rm_accuracy.json"
    # tiny_rm has a random head: the point here is the plumbing, the numbers are checked below
    code = main(["eval-rm", "--model", str(tiny_rm), "--input", str(hh), "--input", str(comparisons),
                 "--output", str(out.parent), "--set", "eval_rm.limit=24", "--set", "eval_rm.max_length=128",
                 "--set", "eval_rm.resources.concurrency=1", "--set", "ray.num_cpus=2"])
    assert code == 0
    report = json.loads(out.read_text())
    hh_row, c_row = report["results"]
    assert hh_row["pairs"] == 24 and c_row["pairs"] == 6
    assert c_row["length_baseline"] == 1.0
    assert 0.0 <= hh_row["rm_accuracy"] <= 1.0
    # HH-RLHF's first 24 pairs: the baseline is what counting characters gives
    from almost_ray.data.preferences import load_pairs

    assert hh_row["length_baseline"] == pytest.approx(length_baseline(load_pairs(hh, limit=24)))
    printed = capsys.readouterr().out
    assert "hh_helpful_base_test_500.jsonl" in printed and "longer" in printed
    assert out.with_suffix(".png").stat().st_size > 0


def test_eval_rm_bad_input_exits_2(tmp_path, capsys, tiny_rm):
    from almost_ray.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    assert main(["eval-rm", "--model", str(tiny_rm), "--input", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1: rejected: field required" in capsys.readouterr().err
