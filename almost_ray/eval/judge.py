"""Pairwise judging with order swap (ALMoST Section 3.1 and Appendix E; Hewitt et al. Section 3).

Model A and model B answer the same questions (Vicuna's 80, AlpacaEval's 805). A judge compares
each pair of answers:

- `model`: a local LM is shown the question and both answers (as Answer A and Answer B) and its
  verdict is p(" A") vs p(" B"). Judges favour a position (ALMoST footnote 9 on GPT-4), so each pair
  is judged twice, once in each order. Model A **wins** when both verdicts prefer its answer, **loses**
  when both prefer B's, and the pair is a **tie** when the two orders disagree (the paper's protocol).
  A judge with a strong position bias makes nearly every pair a tie; `decision: margin_sum` instead
  decides on the sum of the two orders' log-odds, in which a fixed position preference cancels.
- `reward`: a reward model scores each answer on its own, so order cannot matter; A wins when its
  reward is higher by more than `tie_margin`, and the pair is a tie within it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from almost_ray.data.records import RecordError
from almost_ray.data.sources import read_rows
from almost_ray.eval.config import JudgeEvalConfig
from almost_ray.eval.scoring import Scores
from almost_ray.eval.stats import proportion
from almost_ray.eval.templates import JUDGE_TEMPLATE, continuation, load_template, render

FIELDS = {"question", "answer_a", "answer_b"}


def load_questions(path: str | Path, name: str, limit: int | None = None) -> list[dict]:
    """`[{"id", "set", "question"}]` from Vicuna (`turns`), AlpacaEval (`instruction`) or `text` lines."""
    out = []
    for lineno, obj in enumerate(read_rows(path), start=1):
        if limit is not None and len(out) >= limit:
            break
        if isinstance(obj.get("turns"), list) and obj["turns"]:
            text = obj["turns"][0]  # the first turn: both papers judge single-turn answers
        else:
            text = obj.get("instruction", obj.get("text", obj.get("question")))
        if not isinstance(text, str) or not text.strip():
            raise RecordError(f"{path}:{lineno}: expected 'turns', 'instruction', 'text' or 'question'")
        out.append({"id": f"{name}:{obj.get('question_id', len(out))}", "set": name, "question": text})
    return out


def order_verdict(margin: float, tie_margin: float = 0.0) -> str:
    """One judgement: 'a' when the margin (for model A's answer) exceeds `tie_margin`, 'b' below -it."""
    if margin > tie_margin:
        return "a"
    if margin < -tie_margin:
        return "b"
    return "tie"


def combine(first: str, swapped: str) -> str:
    """The pair's outcome for model A from the verdicts in both orders: agreement or a tie."""
    if first == swapped == "a":
        return "win"
    if first == swapped == "b":
        return "loss"
    return "tie"


def build_rows(questions: list[dict], answers_a: dict[str, str], answers_b: dict[str, str],
               cfg: JudgeEvalConfig, tokenizer=None) -> list[dict]:
    """Two verdict rows per question: model A's answer shown first (`:ab`) and second (`:ba`)."""
    template = load_template(cfg.prompt, FIELDS, "eval.judge.prompt", JUDGE_TEMPLATE)
    rows = []
    for q in questions:
        a, b = answers_a[q["id"]], answers_b[q["id"]]
        for suffix, first, second in ((":ab", a, b), (":ba", b, a)):
            context = render(template, {"question": q["question"], "answer_a": first, "answer_b": second},
                             cfg.prompt.style, tokenizer)
            rows.append({"key": q["id"] + suffix, "context": context,
                         "continuations": [continuation(context, x) for x in cfg.letters]})
    return rows


def reward_rows(questions: list[dict], answers_a: dict[str, str], answers_b: dict[str, str]) -> list[dict]:
    """One row per question for a reward-model judge: the two answers as continuations of the question."""
    return [{"key": q["id"], "context": q["question"], "messages": [{"role": "user", "content": q["question"]}],
             "continuations": [answers_a[q["id"]], answers_b[q["id"]]]} for q in questions]


def outcomes(questions: list[dict], scores: Scores, cfg: JudgeEvalConfig) -> list[dict]:
    """Per question: the verdict of each order and the outcome for model A."""
    records = []
    for q in questions:
        if cfg.kind == "reward":
            ra, rb = scores[q["id"]]["logprobs"]
            v = order_verdict(ra - rb, cfg.tie_margin)
            records.append({"id": q["id"], "set": q["set"], "margin": ra - rb, "outcome": combine(v, v)})
            continue
        ab, ba = scores[q["id"] + ":ab"]["logprobs"], scores[q["id"] + ":ba"]["logprobs"]
        m_first, m_swapped = ab[0] - ab[1], ba[1] - ba[0]  # both: log-odds in favour of model A's answer
        first, swapped = order_verdict(m_first, cfg.tie_margin), order_verdict(m_swapped, cfg.tie_margin)
        if cfg.decision == "margin_sum":  # a fixed preference b for position A adds +b and -b: it cancels
            both = order_verdict(m_first + m_swapped, cfg.tie_margin)
            outcome = combine(both, both)
        else:
            outcome = combine(first, swapped)
        records.append({"id": q["id"], "set": q["set"], "margin_first": m_first, "margin_swapped": m_swapped,
                        "verdict_first": first, "verdict_swapped": swapped, "outcome": outcome,
                        "picks_position_a": int(first == "a") + int(swapped == "b")})
    return records


def rates(records: list[dict]) -> dict:
    """Win / tie / loss rates (Wilson 95 % CIs) and the win rate counting a tie as half."""
    n = len(records)
    c = Counter(r["outcome"] for r in records)
    out = {k: proportion(c[k], n) for k in ("win", "tie", "loss")}
    out["win_rate_ties_half"] = (c["win"] + 0.5 * c["tie"]) / n if n else None
    out["n"] = n
    return out


def answer_stats(answers: dict[str, str]) -> dict:
    """Length and repetition of one model's answers, the two things the 3-rule adapter targets
    (Hewitt et al. Section 6.1: rule 1 ends responses sooner, rule 3 discourages reusing words)."""
    words = [a.split() for a in answers.values()]
    n = len(words) or 1
    return {
        "mean_words": sum(len(w) for w in words) / n,
        "mean_repeated_word_fraction": sum(1 - len(set(w)) / len(w) for w in words if w) / n,
        "empty": sum(not w for w in words),
        "n": len(words),
    }


def summarize(records: list[dict]) -> dict:
    sets = sorted({r["set"] for r in records})
    out = {"overall": rates(records), "sets": {s: rates([r for r in records if r["set"] == s]) for s in sets}}
    if records and "picks_position_a" in records[0]:  # the judge's own position bias (50 % = none)
        out["judge_rate_answer_a"] = proportion(sum(r["picks_position_a"] for r in records), 2 * len(records))
    return out
