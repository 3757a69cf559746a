"""TruthfulQA MC1: the highest-scored choice, right only when it is the labelled one alone."""

from __future__ import annotations

import json

import pytest

from almost_ray.data.records import RecordError
from almost_ray.eval import truthfulqa
from almost_ray.eval.config import TruthfulQAEvalConfig

QUESTIONS = [
    # the true answer is listed last here: nothing may depend on position
    {"question": "What colour is the sky on a clear day?",
     "mc1_targets": {"Green.": 0, "It is always night.": 0, "Blue.": 1}},
    {"question": "How many legs does a spider have?", "mc1_targets": {"Eight.": 1, "Six, like every insect.": 0}},
]


@pytest.fixture
def items(tmp_path):
    path = tmp_path / "tqa.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return truthfulqa.load_items(path)


def test_true_answer_comes_from_the_label(items):
    assert items[0].correct == 2 and items[0].choices[2] == "Blue."
    assert items[1].correct == 0


def test_accuracy_picks_the_highest_choice(items):
    rows = truthfulqa.build_rows(items, TruthfulQAEvalConfig())
    assert rows[0]["continuations"] == [" Green.", " It is always night.", " Blue."]
    scores = {"0": {"logprobs": [-5.0, -9.0, -2.0], "lengths": [2, 5, 2]},
              "1": {"logprobs": [-3.0, -2.5], "lengths": [2, 6]}}
    metrics, records = truthfulqa.summarize(items, scores, TruthfulQAEvalConfig())
    assert [r["correct"] for r in records] == [True, False]
    assert metrics["accuracy"]["k"] == 1 and metrics["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_length_normalisation_can_change_the_pick(items):
    scores = {"0": {"logprobs": [-5.0, -9.0, -2.0], "lengths": [2, 5, 2]},
              "1": {"logprobs": [-3.0, -2.5], "lengths": [2, 6]}}
    by_tokens = TruthfulQAEvalConfig(normalize="tokens")
    _, records = truthfulqa.summarize(items, scores, by_tokens)
    assert records[1]["scores"] == pytest.approx([-1.5, -2.5 / 6]) and records[1]["correct"] is False
    scores["1"]["logprobs"] = [-3.0, -12.0]  # per token: -1.5 vs -2.0
    _, records = truthfulqa.summarize(items, scores, by_tokens)
    assert records[1]["correct"] is True
    _, records = truthfulqa.summarize(items, scores, TruthfulQAEvalConfig(normalize="chars"))
    assert records[1]["scores"][0] == pytest.approx(-3.0 / len("Eight."))


def test_a_tie_at_the_top_is_wrong(items):
    scores = {"0": {"logprobs": [-2.0, -9.0, -2.0], "lengths": [1, 1, 1]},
              "1": {"logprobs": [-1.0, -3.0], "lengths": [1, 1]}}
    _, records = truthfulqa.summarize(items, scores, TruthfulQAEvalConfig())
    assert records[0]["correct"] is False and records[1]["correct"] is True


def test_true_false_mode_scores_each_choice(items):
    cfg = TruthfulQAEvalConfig(mode="true_false")
    rows = truthfulqa.build_rows(items, cfg)
    assert [r["key"] for r in rows] == ["0:0", "0:1", "0:2", "1:0", "1:1"]
    assert "Proposed answer: Blue." in rows[2]["context"] and rows[2]["continuations"] == [" true", " false"]
    lp = {"0:0": [-3, -1], "0:1": [-4, -1], "0:2": [-1, -2], "1:0": [-2, -2.5], "1:1": [-1, -3]}
    metrics, records = truthfulqa.summarize(items, {k: {"logprobs": v} for k, v in lp.items()}, cfg)
    assert records[0]["scores"] == [-2, -3, 1] and records[0]["correct"] is True
    assert records[1]["correct"] is False  # "Six" is deemed truer (+2 vs +0.5)


def test_bad_record_names_file_line_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "mc1_targets": {"a": 1, "b": 1}}) + "\n")
    with pytest.raises(RecordError, match=r"bad\.jsonl:1: mc1_targets"):
        truthfulqa.load_items(path)


def test_full_set_loads(shared_data):
    items = truthfulqa.load_items(shared_data / "truthfulqa_mc.jsonl")
    assert len(items) == 817
    assert sum(len(it.choices) for it in items) == 4186
    assert all(0 <= it.correct < len(it.choices) for it in items)
