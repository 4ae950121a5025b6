"""Statistics of a study: the paper's cell (median over seeds of the mean over folds), Tukey whiskers, and
paired comparisons against a baseline (bootstrap interval of the mean gain, Wilcoxon signed-rank test)."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np


def fold_means(values: dict[tuple[int, int], float]) -> dict[int, float]:
    """{(fold, seed): metric} -> {seed: mean over that seed's folds}."""
    by_seed: dict[int, list[float]] = defaultdict(list)
    for (_fold, seed), v in values.items():
        by_seed[seed].append(v)
    return {s: float(np.mean(v)) for s, v in sorted(by_seed.items())}


def cell(values: dict[tuple[int, int], float]) -> dict[str, float]:
    """Median over seeds of the mean over folds, with the spread of those per-seed means."""
    means = np.array(list(fold_means(values).values()))
    q1, q3 = np.percentile(means, [25, 75])
    return {"median": float(np.median(means)), "min": float(means.min()), "max": float(means.max()),
            "q1": float(q1), "q3": float(q3), "seeds": len(means)}


def whiskers(values: list[float]) -> dict[str, Any]:
    """Tukey's box: quartiles, whiskers at the most extreme data within 1.5 IQR of the box, and the outliers."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    iqr = q3 - q1
    inside = v[(v >= q1 - 1.5 * iqr) & (v <= q3 + 1.5 * iqr)]
    return {"q1": float(q1), "median": float(med), "q3": float(q3), "low": float(inside.min()),
            "high": float(inside.max()), "outliers": [float(x) for x in v if x < inside.min() or x > inside.max()]}


def paired_bootstrap(diffs: list[float], n_boot: int = 10000, seed: int = 0, level: float = 0.95
                     ) -> tuple[float, float, float]:
    """(mean gain, low, high): percentile interval of the mean of resampled paired differences."""
    d = np.asarray(diffs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    alpha = (1 - level) / 2
    return float(d.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def wilcoxon_signed_rank(diffs: list[float]) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank test of paired differences (zeros dropped, as Wilcoxon did).

    Exact null distribution when there are no ties among |d| and at most 25 pairs; otherwise the normal
    approximation with tie correction. Returns the statistic (smaller rank sum), p-value and method.
    """
    d = np.asarray([x for x in diffs if x != 0], dtype=np.float64)
    n = len(d)
    if n == 0:
        return {"statistic": 0.0, "p": 1.0, "n": 0, "method": "no non-zero differences"}
    absd = np.abs(d)
    order = np.argsort(absd, kind="mergesort")
    ranks = np.empty(n)
    sorted_abs = absd[order]
    i = 0
    while i < n:  # average ranks over ties
        j = i
        while j + 1 < n and sorted_abs[j + 1] == sorted_abs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    w_plus = float(ranks[d > 0].sum())
    w_minus = float(ranks[d < 0].sum())
    stat = min(w_plus, w_minus)
    ties = len(np.unique(absd)) < n
    if not ties and n <= 25:
        counts = np.zeros(n * (n + 1) // 2 + 1)
        counts[0] = 1
        for r in range(1, n + 1):  # number of sign patterns reaching each rank sum
            counts[r:] = counts[r:] + counts[:-r].copy()
        cdf = counts[: int(stat) + 1].sum() / 2 ** n
        return {"statistic": stat, "p": float(min(1.0, 2 * cdf)), "n": n, "method": "exact"}
    mean = n * (n + 1) / 4
    _, tie_counts = np.unique(absd, return_counts=True)
    var = n * (n + 1) * (2 * n + 1) / 24 - (tie_counts ** 3 - tie_counts).sum() / 48
    z = (stat - mean) / math.sqrt(var)
    p = math.erfc(abs(z) / math.sqrt(2))
    return {"statistic": stat, "p": float(min(1.0, p)), "n": n, "method": "normal approximation"}


def compare(config: dict[tuple[int, int], float], baseline: dict[tuple[int, int], float], seed: int = 0
            ) -> dict[str, Any]:
    """Gain of a configuration over the baseline, paired by (fold, seed). A single pair gives no interval
    (`ci95` None): resampling one difference only repeats it."""
    keys = sorted(set(config) & set(baseline))
    diffs = [config[k] - baseline[k] for k in keys]
    if not diffs:
        return {"pairs": 0}
    ci = list(paired_bootstrap(diffs, seed=seed)[1:]) if len(diffs) > 1 else None
    return {"pairs": len(diffs), "mean_gain": float(np.mean(diffs)), "ci95": ci,
            "wilcoxon": wilcoxon_signed_rank(diffs),
            "win_rate": float(np.mean([x > 0 for x in diffs]))}

