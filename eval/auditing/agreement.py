"""Agreement statistics for the judge audit: Cohen's κ, quadratic-weighted κ, rank correlation, and bootstrap
intervals over questions (a question's turns and repeats move together, as in eval.stats).

    cohen_kappa([("A", "A"), ("A", "B"), ...])      # chance-corrected agreement of two raters on categories
    weighted_kappa([(7, 8), (3, 3), ...])          # the same for 1–10 scores, a near miss counting partly

κ is None when it is undefined: chance agreement is total (both raters used one and the same value throughout),
so no agreement beyond chance can be measured. Such a case is reported as undefined, never as 0 or 1.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Optional

import numpy as np

from eval.common import digest
from eval.stats import DEFAULT_RESAMPLES

Pair = tuple[Any, Any]


def cohen_kappa(pairs: Sequence[Pair]) -> Optional[float]:
    """κ = (p_o − p_e) / (1 − p_e): observed agreement p_o against the agreement p_e two raters with these
    marginals reach by chance."""
    n = len(pairs)
    if n == 0:
        return None
    observed = sum(a == b for a, b in pairs) / n
    first, second = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    chance = sum(first[c] * second[c] for c in first) / n**2
    if chance >= 1.0:
        return None
    return (observed - chance) / (1.0 - chance)


def weighted_kappa(pairs: Sequence[tuple[float, float]]) -> Optional[float]:
    """Quadratic-weighted κ = 1 − Σ(a−b)² / E[(a−b)²] under independence: the mean squared disagreement of the
    pairs against that of every first rating with every second rating. With the scores as categories and weights
    (i−j)², this is Cohen's weighted κ; half points need no category table."""
    n = len(pairs)
    if n == 0:
        return None
    a = np.array([float(x) for x, _ in pairs])
    b = np.array([float(y) for _, y in pairs])
    observed = float(np.mean((a - b) ** 2))
    chance = float(np.mean((a[:, None] - b[None, :]) ** 2))
    if chance == 0.0:
        return None
    return 1.0 - observed / chance


def spearman(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Spearman's rank correlation (average ranks for ties); None with fewer than 3 points or a constant side."""
    if len(xs) < 3:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(1, len(v) + 1)
    for value in np.unique(v):  # ties share their average rank
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def bootstrap_statistic(groups: dict[Hashable, list], statistic: Callable[[list], Optional[float]], seed: int,
                        name: str, resamples: int = DEFAULT_RESAMPLES) -> dict[str, Any]:
    """`statistic` over all items with a 95% interval from resampling the groups (questions) with replacement.
    Resamples where the statistic is undefined are left out and counted."""
    groups = {k: v for k, v in groups.items() if v}
    items = [x for v in groups.values() for x in v]
    value = statistic(items)
    out: dict[str, Any] = {"value": _round(value), "ci95": None, "n": len(items), "questions": len(groups)}
    if value is None or len(groups) < 2:
        return out
    keys = list(groups)
    rng = np.random.default_rng(int(digest(seed, name), 16))
    draws = []
    for idx in rng.integers(0, len(keys), size=(resamples, len(keys))):
        s = statistic([x for i in idx for x in groups[keys[i]]])
        if s is not None:
            draws.append(s)
    if draws:
        lo, hi = np.percentile(draws, [2.5, 97.5])
        out["ci95"] = [_round(float(lo)), _round(float(hi))]
    out["undefined_resamples"] = resamples - len(draws)
    return out


def share(indicators: list[bool]) -> Optional[float]:
    """The share of True; None for no items."""
    return sum(indicators) / len(indicators) if indicators else None


def _round(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 4)
