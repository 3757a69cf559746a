"""Response ranking (Hewitt et al. Section 4.2) and pairwise judging with order swap."""

from __future__ import annotations

import json

import pytest

from almost_ray.data.records import RecordError
from almost_ray.eval import judge, ranking
from almost_ray.eval.config import JudgeEvalConfig, RankingEvalConfig


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_others_are_distinct_other_items_and_seeded():
    others = ranking.draw_others(10, 3, seed=1)
    assert all(len(set(o)) == 3 and i not in o and all(0 <= j < 10 for j in o) for i, o in enumerate(others))
    assert others == ranking.draw_others(10, 3, seed=1)
    assert ranking.draw_others(3, 5, seed=0)[0] in ([1, 2], [2, 1])  # at most n - 1


def test_pairs_from_three_formats(tmp_path):
    path = write(tmp_path / "p.jsonl", [
        {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?"},
        {"instruction": "Name a colour.", "output": "Red."},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."}]},
        {"prompt": "Too long", "response": "x" * 50},
    ])
    pairs = ranking.load_pairs(path, max_chars=40)
    assert [p.response for p in pairs] == ["Hello! How can I help?", "Red.", "4."]
    assert pairs[0].messages == (("user", "Hi there"),)
    with pytest.raises(RecordError, match=r"q\.jsonl:1: expected"):
        ranking.load_pairs(write(tmp_path / "q.jsonl", [{"question": "?"}]), 100)


def test_ranking_counts_triples(tmp_path):
    pairs = ranking.load_pairs(write(tmp_path / "p.jsonl", [
        {"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(4)]), 100)
    rows = ranking.build_rows(pairs, RankingEvalConfig(others_per_item=2, seed=3))
    assert rows[0]["context"] == "\n\nHuman: Question 0?\n\nAssistant:"
    assert rows[0]["continuations"][0] == " Answer 0."
    assert [c for c in rows[0]["continuations"][1:]] == [f" Answer {j}." for j in rows[0]["others"]]
    # known scores: own response best for items 0-2, worst for item 3
    scores = {r["key"]: {"logprobs": [-1.0, -2.0, -3.0] if r["key"] != "3" else [-9.0, -2.0, -3.0]} for r in rows}
    metrics, records = ranking.summarize(rows, scores)
    assert metrics["ranking_capability"]["k"] == 6 and metrics["ranking_capability"]["n"] == 8
    assert records[3]["wins"] == 0


def test_ranking_in_the_tulu_format_matches_response_tuning_text(tmp_path):
    """`style: tulu` ranks a response-tuned / single-task model in the text it was trained on."""
    from almost_ray.train.sft import render

    pairs = ranking.load_pairs(write(tmp_path / "p.jsonl", [
        {"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(3)]), 100)
    rows = ranking.build_rows(pairs, RankingEvalConfig(style="tulu", others_per_item=1))
    assert rows[0]["context"] == "<|user|>\nQuestion 0?\n<|assistant|>\n"
    assert rows[0]["continuations"][0] == "Answer 0."
    trained, _ = render([{"role": "user", "content": "Question 0?"}, {"role": "assistant", "content": "Answer 0."}],
                        "tulu")
    assert rows[0]["context"] + rows[0]["continuations"][0] == trained


def test_order_swap_tie_logic():
    assert judge.combine("a", "a") == "win"
    assert judge.combine("b", "b") == "loss"
    assert judge.combine("a", "b") == judge.combine("b", "a") == "tie"
    assert judge.combine("tie", "a") == "tie"
    assert judge.order_verdict(0.3) == "a" and judge.order_verdict(-0.3) == "b" and judge.order_verdict(0.0) == "tie"
    assert judge.order_verdict(0.3, tie_margin=0.5) == "tie"


QUESTIONS = [{"id": f"v:{i}", "set": "v", "question": f"Q{i}?"} for i in range(4)]
A = {f"v:{i}": f"answer-a-{i}" for i in range(4)}
B = {f"v:{i}": f"answer-b-{i}" for i in range(4)}


def letter_judge(prefers: dict[str, str], first_bias: float):
    """A judge with known log-likelihoods: it prefers model `prefers[qid]`'s answer by 1 nat and
    position A by `first_bias` nats."""

    def score(rows, name=""):
        out = {}
        for r in rows:
            qid, order = r["key"].rsplit(":", 1)
            a_is_model_a = order == "ab"
            likes_a = (prefers[qid] == "a") == a_is_model_a
            la = first_bias + (1.0 if likes_a else 0.0)
            lb = 0.0 if likes_a else 1.0
            out[r["key"]] = {"logprobs": [la, lb]}
        return out

    return score


def test_judge_rows_show_both_orders():
    rows = judge.build_rows(QUESTIONS[:1], A, B, JudgeEvalConfig())
    assert [r["key"] for r in rows] == ["v:0:ab", "v:0:ba"]
    ab, ba = rows[0]["context"], rows[1]["context"]
    assert ab.index("answer-a-0") < ab.index("answer-b-0") and ba.index("answer-b-0") < ba.index("answer-a-0")
    assert rows[0]["continuations"] == [" A", " B"]


def test_a_position_biased_judge_gives_ties_and_a_fair_one_gives_wins():
    prefers = {"v:0": "a", "v:1": "a", "v:2": "a", "v:3": "b"}
    rows = judge.build_rows(QUESTIONS, A, B, JudgeEvalConfig())
    fair = judge.outcomes(QUESTIONS, letter_judge(prefers, 0.0)(rows), JudgeEvalConfig())
    assert [r["outcome"] for r in fair] == ["win", "win", "win", "loss"]
    r = judge.rates(fair)
    assert (r["win"]["k"], r["tie"]["k"], r["loss"]["k"], r["n"]) == (3, 0, 1, 4)
    assert r["win_rate_ties_half"] == 0.75
    # a judge that always says "A" (bias 2 > preference 1): the orders disagree on every pair
    biased = judge.outcomes(QUESTIONS, letter_judge(prefers, 2.0)(rows), JudgeEvalConfig())
    assert all(x["outcome"] == "tie" for x in biased)
    assert judge.rates(biased)["win_rate_ties_half"] == 0.5
    assert judge.summarize(biased)["judge_rate_answer_a"]["value"] == 1.0
    assert judge.summarize(fair)["judge_rate_answer_a"]["value"] == 0.5
    # deciding on the sum of both orders' margins cancels the position bias: the fair outcomes again
    summed = judge.outcomes(QUESTIONS, letter_judge(prefers, 2.0)(rows), JudgeEvalConfig(decision="margin_sum"))
    assert [r["outcome"] for r in summed] == ["win", "win", "win", "loss"]


def test_answer_stats():
    stats = judge.answer_stats({"1": "a b a b", "2": "one two three", "3": ""})
    assert stats["mean_words"] == pytest.approx(7 / 3) and stats["empty"] == 1
    assert stats["mean_repeated_word_fraction"] == pytest.approx(0.5 / 3)


def test_reward_model_judge_with_tie_margin():
    rows = judge.reward_rows(QUESTIONS, A, B)
    assert rows[0]["messages"] == [{"role": "user", "content": "Q0?"}] and rows[0]["continuations"] == ["answer-a-0",
                                                                                                      "answer-b-0"]
    rewards = {"v:0": [1.0, 0.0], "v:1": [0.0, 1.0], "v:2": [0.5, 0.45], "v:3": [2.0, -1.0]}
    cfg = JudgeEvalConfig(kind="reward", reward_model="rm", tie_margin=0.1)
    records = judge.outcomes(QUESTIONS, {k: {"logprobs": v} for k, v in rewards.items()}, cfg)
    assert [r["outcome"] for r in records] == ["win", "loss", "tie", "win"]
    summary = judge.summarize(records)
    assert summary["sets"]["v"]["n"] == 4 and summary["overall"]["win"]["value"] == 0.5


def test_questions_from_vicuna_and_alpaca_eval(shared_data):
    vicuna = judge.load_questions(shared_data / "vicuna_questions.jsonl", "vicuna")
    alpaca = judge.load_questions(shared_data / "alpaca_eval_instructions.jsonl", "alpaca_eval", limit=5)
    assert len(vicuna) == 80 and vicuna[0]["id"] == "vicuna:1"
    assert vicuna[0]["question"] == "How can I improve my time management skills?"
    assert len(alpaca) == 5 and alpaca[1]["question"] == "How did US states get their names?"
