"""Paired comparisons of two models on the same examples (Table 1: CAP vs Wanda, each vs dense).

Two pruned models evaluated on the *same* examples are compared example by example, which is
far more sensitive than comparing two independent confidence intervals: most examples are
answered alike by both, and only the discordant ones carry information about the difference.

* Accuracy: the difference of the two accuracies with a paired percentile bootstrap 95%
  interval (examples resampled with replacement, the same indices for both models; fixed seed,
  10,000 resamples by default) and the exact McNemar test: under "no difference" each of the
  ``b + c`` discordant examples is equally likely to favour either model, so the two-sided
  p-value is ``min(1, 2 P[Binomial(b + c, 1/2) <= min(b, c)])`` (1 when there is no discordant
  example).
* Perplexity: the mean over windows of the difference of per-window mean NLL (nats per
  token; the perplexity ratio is ``exp`` of it) with the same paired bootstrap interval.

Every function is pure: inputs are per-example outcomes aligned by example (see :func:`align`).

Example:
    >>> d = paired_accuracy([1, 1, 0, 1], [1, 0, 0, 0])
    >>> d.delta, d.discordant_a, d.discordant_b
    (0.5, 2, 0)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy.stats import binom

N_RESAMPLES = 10_000
SEED = 0


@dataclass(frozen=True)
class PairedDifference:
    """``a`` minus ``b`` on the same examples.

    Attributes:
        delta: mean of the per-example differences (accuracy: a's minus b's; NLL: nats/token).
        ci_low, ci_high: paired percentile bootstrap interval of ``delta``.
        n: examples (windows) compared.
        discordant_a: examples only ``a`` got right (accuracy; 0 for NLL).
        discordant_b: examples only ``b`` got right (accuracy; 0 for NLL).
        mcnemar_p: exact McNemar two-sided p-value (accuracy), ``None`` for NLL.
        n_resamples, seed, confidence: the bootstrap's settings.
    """

    delta: float
    ci_low: float
    ci_high: float
    n: int
    discordant_a: int
    discordant_b: int
    mcnemar_p: float | None
    n_resamples: int
    seed: int
    confidence: float

    def to_dict(self) -> dict:
        return asdict(self)


def bootstrap_mean_interval(diff: Sequence[float], n_resamples: int = N_RESAMPLES, seed: int = SEED,
                            confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-example differences ``diff`` (n,).

    The same resampled example indices apply to both models, which is what makes it paired.
    """
    d = np.asarray(diff, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"need a non-empty 1-D sequence of differences, got shape {d.shape}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples={n_resamples}; must be >= 1")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}; must be in (0, 1)")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for lo in range(0, n_resamples, 1000):  # (chunk, n) index draws, bounded memory
        idx = rng.integers(0, d.size, size=(min(1000, n_resamples - lo), d.size))
        means[lo:lo + idx.shape[0]] = d[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def mcnemar_exact_p(discordant_a: int, discordant_b: int) -> float:
    """Two-sided exact McNemar p-value from the two discordant counts."""
    if discordant_a < 0 or discordant_b < 0:
        raise ValueError(f"discordant counts must be >= 0, got {discordant_a} and {discordant_b}")
    n = discordant_a + discordant_b
    if n == 0:
        return 1.0
    return float(min(1.0, 2.0 * binom.cdf(min(discordant_a, discordant_b), n, 0.5)))


def _as_binary(name: str, x) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must hold 0/1 or booleans per example; got values {sorted(set(arr.tolist()))[:5]}")
    return arr.astype(np.int64)


def paired_accuracy(correct_a: Sequence, correct_b: Sequence, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                    confidence: float = 0.95) -> PairedDifference:
    """Accuracy of ``a`` minus accuracy of ``b``, with a paired bootstrap interval and McNemar's p.

    Args:
        correct_a: (n,) whether model ``a`` answered each example correctly.
        correct_b: (n,) the same for ``b``, on the same examples in the same order.
        n_resamples: bootstrap resamples (>= 10,000 for reported numbers).
        seed: bootstrap seed.
        confidence: interval coverage.
    """
    a, b = _as_binary("correct_a", correct_a), _as_binary("correct_b", correct_b)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equally long non-empty outcome lists, got {a.shape} and {b.shape}")
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    low, high = bootstrap_mean_interval(a - b, n_resamples, seed, confidence)
    return PairedDifference(float((a - b).mean()), low, high, int(a.size), only_a, only_b,
                            mcnemar_exact_p(only_a, only_b), n_resamples, seed, confidence)


def paired_nll(window_nll_a: Sequence[float], window_nll_b: Sequence[float], n_resamples: int = N_RESAMPLES,
               seed: int = SEED, confidence: float = 0.95) -> PairedDifference:
    """Mean per-window NLL of ``a`` minus that of ``b`` (nats/token) on the same windows.

    ``exp(delta)`` is the perplexity ratio when every window predicts the same number of tokens.
    """
    a, b = np.asarray(window_nll_a, dtype=np.float64), np.asarray(window_nll_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equally long non-empty window lists, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("window NLLs must be finite")
    low, high = bootstrap_mean_interval(a - b, n_resamples, seed, confidence)
    return PairedDifference(float((a - b).mean()), low, high, int(a.size), 0, 0, None, n_resamples, seed, confidence)


def align(outcomes_a: dict, outcomes_b: dict) -> tuple[list, list]:
    """Two ``{example id: outcome}`` maps as two lists over their shared ids (sorted).

    Raises:
        ValueError: the two evaluations share no example, or differ in which examples they
            hold (a paired comparison needs the same examples on both sides).
    """
    if set(outcomes_a) != set(outcomes_b):
        only = sorted(set(outcomes_a) ^ set(outcomes_b))
        raise ValueError(f"the two evaluations hold different examples ({len(only)} differ, e.g. {only[:3]}); "
                         "a paired comparison needs the same examples")
    if not outcomes_a:
        raise ValueError("no examples to compare")
    ids = sorted(outcomes_a)
    return [outcomes_a[i] for i in ids], [outcomes_b[i] for i in ids]
