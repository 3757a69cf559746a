"""Proportions with 95 % Wilson score intervals: every accuracy and rate in an eval report; mean scores
with their standard error over prompts.

The Wilson interval (Wilson, 1927) stays inside [0, 1] and keeps close to its nominal coverage for
the small counts of these suites (43 items in HHH's smallest subset, 80 Vicuna questions), where
the normal approximation does not.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of `successes` out of `n` (the whole [0, 1] when n is 0)."""
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends: no rounding residue
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def proportion(successes: int, n: int) -> dict:
    """`{"value", "ci_low", "ci_high", "k", "n"}` for a report; value is None when n is 0."""
    lo, hi = wilson_interval(successes, n)
    return {"value": successes / n if n else None, "ci_low": lo, "ci_high": hi, "k": successes, "n": n}


def mean_over_prompts(scores: dict[str, list[float]]) -> dict:
    """`{"mean", "se", "prompts", "n"}` of scores grouped by prompt: the mean of the per-prompt means and its
    standard error over prompts (None under two prompts).

    The answers to one prompt share it, so their scores are not independent draws: the prompt is the unit,
    and a standard error over all answers would claim more certainty than a few prompts give.
    """
    means = [sum(v) / len(v) for v in scores.values() if v]
    if not means:
        return {"mean": None, "se": None, "prompts": 0, "n": 0}
    k = len(means)
    mean = sum(means) / k
    se = math.sqrt(sum((m - mean) ** 2 for m in means) / (k - 1) / k) if k > 1 else None
    return {"mean": mean, "se": se, "prompts": k, "n": sum(len(v) for v in scores.values())}


def paired_difference(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict:
    """a - b on the prompts both answered: `{"mean", "se", "prompts", "higher"}`, the mean over prompts of the
    difference of per-prompt means, its standard error, and the share of prompts where a's mean is higher.

    Pairing by prompt removes what the prompts themselves add to the spread (some prompts get high scores
    from any model), so a difference between two models shows with fewer prompts than two separate means."""
    both = [p for p in a if a[p] and b.get(p)]
    diffs = {p: [sum(a[p]) / len(a[p]) - sum(b[p]) / len(b[p])] for p in both}
    out = mean_over_prompts(diffs)
    higher = sum(d[0] > 0 for d in diffs.values())
    return {"mean": out["mean"], "se": out["se"], "prompts": out["prompts"],
            "higher": higher / len(both) if both else None}
