"""Proportions with 95 % Wilson score intervals: every accuracy and rate in an eval report.

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
