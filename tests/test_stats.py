"""rankkit.stats: the standard error of a difference, checked against simulation and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from rankkit.stats import (
    binomial_se,
    bootstrap_means,
    compare_accuracies,
    compare_seeds,
    difference,
    mean_difference,
)

N_TEST = 260  # the size of a test split of the built-in topics task


@pytest.fixture(scope="module")
def simulated_accuracies():
    """200,000 pairs of independent accuracies on N_TEST examples, true values 0.55 and 0.50."""
    rng = np.random.default_rng(0)
    a = rng.binomial(N_TEST, 0.55, size=200_000) / N_TEST
    b = rng.binomial(N_TEST, 0.50, size=200_000) / N_TEST
    return a, b


def test_binomial_se_is_the_spread_of_simulated_accuracies(simulated_accuracies):
    a, _ = simulated_accuracies
    assert binomial_se(0.55, N_TEST) == pytest.approx(a.std(), rel=0.01)


def test_se_of_a_difference_is_the_spread_of_simulated_differences(simulated_accuracies):
    a, b = simulated_accuracies
    c = difference(0.55, 0.50, binomial_se(0.55, N_TEST), binomial_se(0.50, N_TEST))
    assert c.se == pytest.approx((a - b).std(), rel=0.01)
    # sqrt(2) times one accuracy's error when the two are about equal
    assert c.se / binomial_se(0.5, N_TEST) == pytest.approx(math.sqrt(2), rel=0.01)


def test_the_95_percent_interval_covers_the_true_difference_95_percent_of_the_time(
    simulated_accuracies,
):
    a, b = simulated_accuracies
    covered = [
        abs(compare_accuracies(x, y, N_TEST).difference - 0.05)
        <= compare_accuracies(x, y, N_TEST).critical
        for x, y in zip(a[:4000], b[:4000])
    ]
    assert np.mean(covered) == pytest.approx(0.95, abs=0.01)


def test_the_old_two_se_rule_claims_differences_that_are_not_there():
    """Two models of equal true accuracy: '|difference| > 2 se of one accuracy' fires
    about 16% of the time (P(|Z| > 2 / sqrt 2)); the rule of this module 5%."""
    rng = np.random.default_rng(1)
    a = rng.binomial(N_TEST, 0.5, size=50_000) / N_TEST
    b = rng.binomial(N_TEST, 0.5, size=50_000) / N_TEST
    old = np.abs(a - b) > 2 * binomial_se(a, N_TEST)
    se = np.sqrt(binomial_se(a, N_TEST) ** 2 + binomial_se(b, N_TEST) ** 2)
    new = np.abs(a - b) >= 1.96 * se
    assert old.mean() == pytest.approx(2 * scipy_stats.norm.sf(2 / math.sqrt(2)), abs=0.015)
    assert new.mean() == pytest.approx(0.05, abs=0.015)


def test_a_case_where_the_old_rule_and_the_correct_one_disagree():
    # 0.55 vs 0.47 on 260 examples: 0.08 > 2 x 0.031 (old: "distinguishable"),
    # but 0.08 < 1.96 x 0.044 (the difference's error): within noise.
    se_a = binomial_se(0.55, N_TEST)
    assert 0.08 > 2 * se_a
    c = compare_accuracies(0.55, 0.47, N_TEST)
    assert c.verdict == "within noise" and not c.resolved and c.sign == 0
    assert c.critical == pytest.approx(1.96 * c.se, rel=1e-3)
    assert 0.05 < c.p < 0.1
    assert compare_accuracies(0.60, 0.47, N_TEST).verdict == "higher"
    assert compare_accuracies(0.47, 0.60, N_TEST).verdict == "lower"


def test_welch_matches_scipy():
    a, b = [0.91, 0.93, 0.90, 0.94], [0.88, 0.90, 0.86]
    c = compare_seeds(a, b)
    ref = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert c.statistic == pytest.approx(ref.statistic) and c.p == pytest.approx(ref.pvalue)
    assert c.se == pytest.approx(math.sqrt(np.var(a, ddof=1) / 4 + np.var(b, ddof=1) / 3))
    assert c.method == "welch" and c.resolved == (ref.pvalue < 0.05)


def test_paired_matches_scipy_and_sees_what_welch_cannot():
    # Seed i shifts both sides by the same amount: the pairs differ by about +0.01 every time.
    shift = np.array([0.0, 0.05, -0.04, 0.08, -0.06])
    a, b = 0.9 + shift + [0.011, 0.009, 0.010, 0.012, 0.008], 0.9 + shift
    paired = compare_seeds(a, b, paired=True)
    ref = scipy_stats.ttest_rel(a, b)
    assert paired.statistic == pytest.approx(ref.statistic) and paired.p == pytest.approx(
        ref.pvalue
    )
    assert paired.verdict == "higher"
    assert compare_seeds(a, b).verdict == "within noise"


def test_welch_interval_covers_the_true_difference():
    rng = np.random.default_rng(2)
    hits = 0
    for _ in range(2000):
        a, b = rng.normal(1.0, 0.1, size=3), rng.normal(0.9, 0.3, size=5)
        c = compare_seeds(a, b)
        hits += abs(c.difference - 0.1) <= c.critical
    assert hits / 2000 == pytest.approx(0.95, abs=0.02)


def test_one_seed_has_no_noise_estimate_and_zero_spread_is_exact():
    c = compare_seeds([0.9], [0.8, 0.85])
    assert math.isnan(c.se) and c.verdict == "no noise estimate" and not c.resolved
    assert "no noise estimate" in str(c)
    assert compare_seeds([0.9, 0.9], [0.8, 0.8]).verdict == "higher"
    assert compare_seeds([0.9, 0.9], [0.9, 0.9]).verdict == "within noise"


def test_mean_difference_of_independent_differences():
    mean, se = mean_difference([0.01, -0.03, 0.02], [0.003, 0.004, 0.012])
    assert mean == pytest.approx(0.0)
    assert se == pytest.approx(math.sqrt(0.003**2 + 0.004**2 + 0.012**2) / 3)


def test_bootstrap_means_resample_the_observed_seeds():
    values = np.array([0.8, 0.9, 1.0])
    means = bootstrap_means(values, 20_000, np.random.default_rng(0))
    assert means.shape == (20_000,)
    assert set(np.round(means * 3, 6)) <= {round(x, 6) for x in np.arange(24, 31) / 10}
    # the variance of a resampled mean of n values is the population variance / n
    assert means.var() == pytest.approx(values.var() / 3, rel=0.03)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: binomial_se(1.2, 10), "proportion"),
        (lambda: binomial_se(0.5, 0), "n must be"),
        (lambda: difference(1, 0, -0.1, 0.1), "standard errors"),
        (lambda: compare_seeds([1, 2], [1], paired=True), "paired=False"),
        (lambda: compare_seeds([], [1]), "at least one"),
        (lambda: compare_accuracies(0.5, 0.4, 100, level=5), "level"),
        (lambda: mean_difference([0.1, 0.2], [0.1]), "one standard error per difference"),
    ],
)
def test_bad_input_gets_one_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def _sweep(full, frozen, lora):
    """A sweep's results table by hand: one row per seed of each configuration."""
    import pandas as pd

    rows = [("full", None, v) for v in full] + [("frozen", None, v) for v in frozen]
    rows += [("lora", r, v) for r, vs in lora.items() for v in vs]
    frame = pd.DataFrame(rows, columns=["method", "rank", "test_metric"])
    frame["targets"] = frame["method"].map(lambda m: "q,v" if m == "lora" else None)
    frame["status"], frame["metric"], frame["alpha"] = "ok", "accuracy", frame["rank"]
    frame["trainable_params"] = frame["trainable_fraction"] = 1.0
    frame["run_id"] = [f"run{i}" for i in range(len(frame))]
    return frame


def test_the_sweep_summary_warns_when_the_gain_is_within_seed_noise():
    from rankkit.sweep import format_summary

    # full - frozen = +0.02 with seed spreads of 0.05: Welch's p is far above 5%.
    noisy = _sweep([0.55, 0.60, 0.65], [0.50, 0.58, 0.66], {1: [0.6, 0.6, 0.6]})
    assert compare_seeds([0.55, 0.60, 0.65], [0.50, 0.58, 0.66]).verdict == "within noise"
    assert "within seed noise (Welch t-test, 5%)" in format_summary(noisy)
    clear = _sweep([0.90, 0.91, 0.92], [0.50, 0.51, 0.52], {1: [0.8, 0.8, 0.8]})
    assert "warning" not in format_summary(clear)
