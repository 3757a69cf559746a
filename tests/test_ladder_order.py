"""Measuring the ladder's order: the pointwise judges, the win-rate matrix, the kept pairs' agreement."""

from __future__ import annotations

import math

import pytest

from almost_ray.models.config import ModelConfig
from almost_ray.synth.ladder_order import JUDGES, PMIJudge, ladder_order, pmi, win_rate


class LengthJudge:
    """Components whose judges all prefer longer responses: log p(y|x) = words, log p(y) = 0, 1 token."""

    def components(self, pairs):
        return [(float(len(y.split())), 0.0, 1) if y.strip() else None for _, y in pairs]


def _responses():
    answers = {"a": ["one two three", "one two three four"], "b": ["one two", "x"], "c": ["one", "one two"]}
    return [{"query_id": f"q{i}", "prompt": f"question {i}", "generator": rung, "responses": [answers[rung][i]]}
            for i in range(2) for rung in ("a", "b", "c")]


def test_pmi_is_per_token_and_an_empty_response_loses():
    assert pmi((-4.0, -10.0, 3)) == pytest.approx(2.0)
    assert pmi(None) == -math.inf
    assert JUDGES["mean_logprob"]((-6.0, -1.0, 3)) == pytest.approx(-2.0)


def test_win_rate_has_a_wilson_interval():
    r = win_rate(8, 2, 1)
    assert r["win_rate"] == 0.8 and r["ties"] == 1 and r["ci95"][0] < 0.8 < r["ci95"][1]
    assert math.isnan(win_rate(0, 0, 3)["win_rate"])


def test_ladder_order_counts_wins_per_rung_pair_and_kept_agreement():
    comparisons = [{"query_id": "q0", "chosen_rung": "a", "rejected_rung": "b"},
                   {"query_id": "q1", "chosen_rung": "b", "rejected_rung": "c"}]
    report = ladder_order(_responses(), comparisons, LengthJudge())
    assert report["rungs"] == ["a", "b", "c"] and report["queries"] == 2
    assert report["adjacent"]["a>b"]["wins"] == 2
    # q0: b (2 words) beats c (1); q1: b (1 word) loses to c (2)
    assert (report["adjacent"]["b>c"]["wins"], report["adjacent"]["b>c"]["losses"]) == (1, 1)
    assert report["all_pairs"]["a>c"]["win_rate"] == 1.0
    assert (report["kept_comparisons"]["wins"], report["kept_comparisons"]["losses"]) == (1, 1)
    assert set(report["by_judge"]) == {"pmi_per_token", "mean_logprob"}


def test_pmi_judge_components_are_the_generators_loglikelihoods():
    judge = PMIJudge(ModelConfig(ref="tiny:llama", dtype="float32", max_batch_size=2), "human_assistant")
    pairs = [("What is two plus two?", "It is four."), ("Name a colour.", "  ")]
    (with_q, without_q, n), empty = judge.components(pairs)
    assert empty is None and n == len(judge.generator.tokenizer(" It is four.", add_special_tokens=False).input_ids)
    expected = judge.generator.loglikelihood(["\n\nHuman: What is two plus two?\n\nAssistant:", "\n\nHuman: \n\nAssistant:"],
                                             [" It is four.", " It is four."])
    assert (with_q, without_q) == pytest.approx(expected, abs=1e-5)


def test_the_demo_ladder_follows_its_recorded_measurement():
    """configs/demo.yaml ranks its rungs as docs/measurements/ladder_order.json measured: no higher rung loses
    to a lower one beyond chance under the PMI judge (a tie, an interval that holds 0.5, is allowed)."""
    import json
    from pathlib import Path

    from almost_ray.config import load_config

    root = Path(__file__).resolve().parents[1]
    measured = json.loads((root / "docs" / "measurements" / "ladder_order.json").read_text())
    configured = [r.name for r in load_config(root / "configs" / "demo.yaml").compare.ladder]
    assert sorted(configured) == sorted(measured["rungs"])
    for i, hi in enumerate(configured):
        for lo in configured[i + 1:]:
            key, flipped = f"{hi}>{lo}", f"{lo}>{hi}"
            if key in measured["all_pairs"]:
                assert measured["all_pairs"][key]["ci95"][1] >= 0.5, key
            else:
                assert measured["all_pairs"][flipped]["ci95"][0] <= 0.5, key
