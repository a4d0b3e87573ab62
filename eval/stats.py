"""Means with bootstrap confidence intervals, resampling questions (a question's two turns move together).

Each statistic draws from its own generator, seeded from the report seed and the statistic's name, so a figure
does not change when other figures are added or computed in another order.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Optional

import numpy as np

from eval.common import EvalError, digest

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
MIN_RESAMPLES, MAX_RESAMPLES = 100, 100_000
"""Fewer than 100 resamples give no 2.5% tail; beyond 100 000 the interval's Monte-Carlo error (well under 0.01 on
a 1-10 scale) no longer moves while memory grows as resamples x questions x 24 bytes per statistic."""


def check_resamples(resamples: int) -> int:
    """`resamples` within [MIN_RESAMPLES, MAX_RESAMPLES]; an EvalError naming --resamples otherwise (before any
    array is allocated)."""
    if isinstance(resamples, bool) or not isinstance(resamples, int) or \
            not MIN_RESAMPLES <= resamples <= MAX_RESAMPLES:
        raise EvalError(f"--resamples is {str(resamples)[:40]}; expected an integer from {MIN_RESAMPLES} (a 95% "
                        f"interval needs its tails) to {MAX_RESAMPLES:,} (more changes the interval by less than "
                        f"its rounding and costs resamples x questions x 24 bytes of memory)")
    return resamples


@dataclass(frozen=True)
class Estimate:
    """A mean over items with its 95% bootstrap interval."""

    mean: Optional[float]
    ci95: Optional[tuple[float, float]]
    n: int
    """Items (question-turns) with a score."""

    def to_dict(self) -> dict[str, object]:
        return {"mean": self.mean, "ci95": list(self.ci95) if self.ci95 else None, "n": self.n}


def bootstrap_mean(groups: dict[Hashable, list[float]], seed: int, name: str,
                   resamples: int = DEFAULT_RESAMPLES) -> Estimate:
    """Mean of all values; CI from resampling the groups (questions) with replacement."""
    check_resamples(resamples)
    groups = {k: v for k, v in groups.items() if v}
    n = sum(len(v) for v in groups.values())
    if n == 0:
        return Estimate(None, None, 0)
    sums = np.array([sum(v) for v in groups.values()], dtype=np.float64)
    counts = np.array([len(v) for v in groups.values()], dtype=np.float64)
    mean = float(sums.sum() / counts.sum())
    rng = np.random.default_rng(int(digest(seed, name), 16))
    idx = rng.integers(0, len(sums), size=(resamples, len(sums)))
    means = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return Estimate(round(mean, 4), (round(float(lo), 4), round(float(hi), 4)), n)
