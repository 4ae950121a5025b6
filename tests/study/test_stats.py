"""Study statistics on fixed numbers: the paper's cell, Tukey whiskers, bootstrap, Wilcoxon vs scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from kdcli.study.stats import cell, compare, fold_means, paired_bootstrap, whiskers, wilcoxon_signed_rank


def test_cell_is_median_over_seeds_of_fold_means():
    values = {(1, 0): 0.70, (2, 0): 0.80, (1, 1): 0.60, (2, 1): 0.62, (1, 2): 0.90, (2, 2): 0.70,
              (1, 3): 0.75, (2, 3): 0.77}
    assert fold_means(values) == pytest.approx({0: 0.75, 1: 0.61, 2: 0.80, 3: 0.76})
    c = cell(values)
    assert c["median"] == pytest.approx((0.75 + 0.76) / 2) and c["min"] == pytest.approx(0.61)
    assert c["max"] == pytest.approx(0.80) and c["seeds"] == 4


def test_whiskers_tukey_rule():
    w = whiskers([1, 2, 3, 4, 5, 6, 7, 8, 100])
    # quartiles 3 and 7 (linear interpolation), IQR 4: whiskers reach the data within [-3, 13]
    assert (w["q1"], w["median"], w["q3"]) == (3.0, 5.0, 7.0)
    assert (w["low"], w["high"]) == (1.0, 8.0) and w["outliers"] == [100.0]


def test_paired_bootstrap_fixed_seed_and_bounds():
    diffs = [0.01, 0.03, -0.01, 0.02, 0.04, 0.00, 0.02, 0.03]
    mean, lo, hi = paired_bootstrap(diffs, n_boot=5000, seed=0)
    assert mean == pytest.approx(np.mean(diffs)) and lo < mean < hi
    assert (mean, lo, hi) == paired_bootstrap(diffs, n_boot=5000, seed=0)  # reproducible
    rng = np.random.default_rng(0)
    ref = np.asarray(diffs)[rng.integers(0, 8, size=(5000, 8))].mean(1)
    assert lo == pytest.approx(np.quantile(ref, 0.025)) and hi == pytest.approx(np.quantile(ref, 0.975))


@pytest.mark.parametrize("diffs", [
    [0.5, -0.2, 1.3, 0.8, 2.1, -0.4, 0.9, 1.7],
    [0.11, 0.24, -0.05, 0.31, 0.08, 0.19, -0.13, 0.27, 0.02, 0.15, 0.22, -0.07],
])
def test_wilcoxon_exact_matches_scipy(diffs):
    ours = wilcoxon_signed_rank(diffs)
    ref = sps.wilcoxon(diffs, method="exact")
    assert ours["method"] == "exact" and ours["statistic"] == ref.statistic
    assert ours["p"] == pytest.approx(ref.pvalue, abs=1e-12)


def test_wilcoxon_normal_approximation_with_ties_matches_scipy():
    diffs = [1, 1, 2, 2, 2, -1, 3, 3, -2, 4, 4, 4, 5, -3, 6, 1, 2, 7, 3, 2, 1, -1, 4, 5, 6, 2, 3, 1, 8, 2]
    ours = wilcoxon_signed_rank(diffs)
    ref = sps.wilcoxon(diffs, method="approx", correction=False)
    assert ours["method"] == "normal approximation" and ours["p"] == pytest.approx(ref.pvalue, rel=1e-9)


def test_compare_pairs_by_fold_and_seed():
    base = {(f, s): 0.7 for f in (1, 2) for s in (0, 1)}
    gains = {(1, 0): 0.01, (2, 0): 0.02, (1, 1): 0.03, (2, 1): 0.04}
    better = {k: v + gains[k] for k, v in base.items()}
    better[(3, 0)] = 0.9  # unpaired: ignored
    c = compare(better, base)
    assert c["pairs"] == 4 and c["mean_gain"] == pytest.approx(0.025) and c["win_rate"] == 1.0
    assert c["wilcoxon"]["p"] == pytest.approx(0.125)  # 4 positive pairs: exact two-sided 2/16
    assert compare({}, base) == {"pairs": 0}
