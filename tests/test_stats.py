"""Paired statistics against hand-computed values and scipy.stats."""
import numpy as np
import pytest
from scipy import stats as sps

from cap_lab.stats import align, bootstrap_mean_interval, mcnemar_exact_p, paired_accuracy, paired_nll


def test_mcnemar_by_hand_and_against_scipy():
    # 1 vs 5 discordant: 2 * P[Bin(6, 1/2) <= 1] = 2 * 7/64
    assert mcnemar_exact_p(1, 5) == pytest.approx(14 / 64)
    assert mcnemar_exact_p(5, 1) == pytest.approx(14 / 64)
    assert mcnemar_exact_p(3, 3) == 1.0 and mcnemar_exact_p(0, 0) == 1.0
    for a, b in ((0, 7), (2, 9), (10, 25), (40, 41)):
        assert mcnemar_exact_p(a, b) == pytest.approx(sps.binomtest(a, a + b, 0.5).pvalue, rel=1e-12)
    with pytest.raises(ValueError, match=">= 0"):
        mcnemar_exact_p(-1, 2)


def test_paired_accuracy_counts_the_discordant_examples():
    a = [1, 1, 1, 0, 1, 0, 1, 1]
    b = [1, 0, 0, 0, 1, 1, 0, 0]
    d = paired_accuracy(a, b, n_resamples=2000)
    assert d.delta == pytest.approx((6 - 3) / 8) and d.n == 8
    assert (d.discordant_a, d.discordant_b) == (4, 1)
    assert d.mcnemar_p == pytest.approx(2 * sum(sps.binom.pmf(k, 5, 0.5) for k in (0, 1)))
    assert d.ci_low <= d.delta <= d.ci_high


def test_identical_models_have_a_zero_width_interval():
    d = paired_accuracy([True, False, True], [True, False, True])
    assert (d.delta, d.ci_low, d.ci_high, d.mcnemar_p) == (0.0, 0.0, 0.0, 1.0)


def test_bootstrap_is_seeded_and_agrees_with_scipy():
    rng = np.random.default_rng(3)
    diff = rng.normal(0.2, 1.0, size=200)
    first = bootstrap_mean_interval(diff, n_resamples=10_000, seed=0)
    assert first == bootstrap_mean_interval(diff, n_resamples=10_000, seed=0)  # fixed seed: identical
    ref = sps.bootstrap((diff,), np.mean, n_resamples=10_000, method="percentile", random_state=1).confidence_interval
    assert first[0] == pytest.approx(ref.low, abs=0.02) and first[1] == pytest.approx(ref.high, abs=0.02)
    half = 1.96 * diff.std(ddof=1) / np.sqrt(diff.size)  # the normal approximation, by hand
    assert first[0] == pytest.approx(diff.mean() - half, abs=0.02)


def test_paired_nll_is_the_mean_window_difference():
    a, b = [2.0, 2.5, 3.0, 2.2], [1.9, 2.0, 2.9, 2.2]
    d = paired_nll(a, b, n_resamples=2000)
    assert d.delta == pytest.approx(np.mean(np.subtract(a, b))) and d.mcnemar_p is None
    assert 0 <= d.ci_low <= d.delta <= d.ci_high <= 0.5
    with pytest.raises(ValueError, match="finite"):
        paired_nll([1.0, float("nan")], [1.0, 1.0])


def test_align_pairs_by_example_and_refuses_different_examples():
    assert align({"q2": 0, "q1": 1}, {"q1": 0, "q2": 1}) == ([1, 0], [0, 1])
    with pytest.raises(ValueError, match="different examples"):
        align({"q1": 1}, {"q2": 1})
    with pytest.raises(ValueError, match="0/1"):
        paired_accuracy([2, 1], [1, 1])
    with pytest.raises(ValueError, match="equally long"):
        paired_accuracy([1, 1], [1])
