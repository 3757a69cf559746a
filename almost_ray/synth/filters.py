"""Binarize a query's ladder responses into comparisons, and post-validate them (ALMoST Section 2.1).

Pure functions, no Ray and no models: the stage (`synth.compare`) feeds them one query's responses.

* `response_issue` is the response half of the **Heuristic Filter**: the paper drops responses
  "containing or beginning with keywords such as 'I don't know' or 'well'"; the released code adds a
  minimum length, a required final `.`/`!`, and drops responses ending with `?`/`:` or containing
  `Human:`/`<Image>`. All of it is configurable (`HeuristicFilterConfig`).
* `length_threshold` / `keeps_length` are the length half: a pair is kept only when its chosen
  response is at least as long as the rejected one, or at least M - S/2 characters long, where M and S
  are the mean and (population) standard deviation of the lengths of Y. Y here is the query's
  responses that passed the response rules, as in the released code (`check_length` skips the
  responses marked BAD): a failed generation that was already thrown away should not drag M down and
  let a short chosen response through.
* `binarize` builds the pairs (chosen = higher rung) and counts every drop with its reason.
"""

from __future__ import annotations

import itertools
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field

from almost_ray.synth.config import HeuristicFilterConfig


@dataclass(frozen=True)
class Candidate:
    """One rung's response to a query; `rank` 0 is the best rung."""

    rank: int
    rung: str
    text: str


@dataclass
class Binarized:
    """The pairs kept for one query, and what was dropped and why."""

    pairs: list[tuple[Candidate, Candidate]] = field(default_factory=list)
    dropped_responses: Counter = field(default_factory=Counter)  # "rung/reason" -> count
    dropped_pairs: Counter = field(default_factory=Counter)  # reason -> count
    threshold: float | None = None


def response_issue(text: str, cfg: HeuristicFilterConfig) -> str | None:
    """Why the Heuristic Filter drops this response (the first rule it breaks), or None to keep it."""
    text = text.strip()
    if not text:
        return "empty"
    if len(text) < cfg.min_chars:
        return "too_short"
    for pattern in cfg.bad_patterns:
        if re.search(pattern, text, flags=re.IGNORECASE):
            return f"bad_phrase:{pattern}"
    lowered = text.lower()
    for start in cfg.bad_starts:
        # a whole word: "Well, ..." is dropped, "Wellington is ..." is not
        if re.match(rf"{re.escape(start.lower())}\b", lowered):
            return f"bad_start:{start}"
    for end in cfg.bad_endings:
        if text.endswith(end):
            return f"bad_ending:{end}"
    if cfg.required_endings and not text.endswith(tuple(cfg.required_endings)):
        return "unfinished"
    return None


def length_threshold(lengths: list[int], std_factor: float = 0.5) -> float:
    """M - std_factor * S over character lengths (population standard deviation, as numpy's default)."""
    if not lengths:
        return 0.0
    return statistics.fmean(lengths) - std_factor * statistics.pstdev(lengths)


def keeps_length(chosen: str, rejected: str, threshold: float) -> bool:
    """The pair survives when the chosen response is not shorter than the rejected one, or reaches M - S/2."""
    return len(chosen) >= len(rejected) or len(chosen) >= threshold


def binarize(
    candidates: list[Candidate], cfg: HeuristicFilterConfig, pairing: str = "all"
) -> Binarized:
    """Comparisons among one query's responses: chosen is always the higher rung (lower `rank`).

    `pairing="all"` keeps every surviving pair (the paper's {(y1,y2), (y2,y3), (y1,y3)}).
    `pairing="one_per_chosen"` follows the released code: each response is chosen at most once, against
    the first lower rung it passes the length rule with.
    """
    out = Binarized()
    ranked = sorted(candidates, key=lambda c: c.rank)
    kept = []
    for c in ranked:
        issue = response_issue(c.text, cfg) if cfg.enabled else (None if c.text.strip() else "empty")
        if issue is None:
            kept.append(c)
        else:
            out.dropped_responses[f"{c.rung}/{issue}"] += 1
    lost = len(ranked) * (len(ranked) - 1) // 2 - len(kept) * (len(kept) - 1) // 2
    if lost:
        out.dropped_pairs["response_filtered"] += lost
    if cfg.enabled and cfg.length_rule:
        out.threshold = length_threshold([len(c.text.strip()) for c in kept], cfg.std_factor)
    chosen_used: set[int] = set()
    for chosen, rejected in itertools.combinations(kept, 2):
        if chosen.rank == rejected.rank:
            continue
        if pairing == "one_per_chosen" and chosen.rank in chosen_used:
            continue
        if out.threshold is not None and not keeps_length(chosen.text.strip(), rejected.text.strip(), out.threshold):
            out.dropped_pairs["length_rule"] += 1
            continue
        chosen_used.add(chosen.rank)
        out.pairs.append((chosen, rejected))
    if pairing == "one_per_chosen":
        considered = len(kept) * (len(kept) - 1) // 2
        skipped = considered - len(out.pairs) - out.dropped_pairs["length_rule"]
        if skipped:
            out.dropped_pairs["one_per_chosen"] += skipped
    return out


def rm_agrees(chosen_score: float, rejected_score: float) -> bool:
    """The As-is RM filter (ALMoST Section 2.1): keep a pair only when the prior RM prefers the chosen."""
    return chosen_score > rejected_score
