"""Choosing which weights to prune from their scores (paper Sec. 3.3, "Global threshold selection").

Pure functions over ``(layer, projection, module)`` targets and a score function
``(layer, projection, W) -> scores of W's shape``; nothing here changes a weight
(:func:`cap_lab.pruning.apply_pruning_masks` does). Scores are computed one matrix at a time,
so no tensor of all scores is ever built.

* :func:`global_threshold`: one threshold over every matrix that prunes exactly the target
  count (a sampled bracket, then an exact order statistic inside it; bisection as fallback);
  ties at the threshold are taken in parameter order;
* :func:`threshold_masks`: the boolean masks of such a threshold;
* :func:`per_matrix_masks`: the same sparsity in every matrix.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

ScoreFn = Callable[[int, str, torch.Tensor], torch.Tensor]
Target = tuple[int, str, nn.Linear]


def _count_below(score_fn: ScoreFn, targets: list[Target], t: float) -> int:
    return sum(int((score_fn(l, n, m.weight) < t).sum()) for l, n, m in targets)


def _bisect_threshold(score_fn: ScoreFn, targets: list[Target], want: int, slack: int,
                      max_iter: int = 100) -> tuple[float, float, int]:
    """Plain bisection on the threshold (one counting pass per step); the fallback."""
    hi = max(float(score_fn(l, n, m.weight).max()) for l, n, m in targets)
    hi = hi * (1 + 1e-6) + 1e-30
    lo, n_lo = 0.0, _count_below(score_fn, targets, 0.0)
    for _ in range(max_iter):
        if abs(n_lo - want) <= slack:
            return lo, lo, 0
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        n_mid = _count_below(score_fn, targets, mid)
        if n_mid <= want:
            lo, n_lo = mid, n_mid
        else:
            hi = mid
    return lo, hi, max(0, want - n_lo)


def global_threshold(score_fn: ScoreFn, targets: list[Target], sparsity: float, tolerance: float = 1e-4,
                     sample_size: int = 1 << 20, seed: int = 0) -> tuple[float, float, int]:
    """The global threshold that prunes exactly ``round(sparsity * total)`` weights.

    A search over the threshold, done in two counting passes rather than one per bisection
    step: (1) a uniform sample of the scores brackets the target quantile with a margin of
    many standard errors; (2) one pass counts the scores below the bracket and collects those
    inside it, whose exact order statistic is the threshold. Should the bracket miss (it is
    astronomically unlikely), plain bisection takes over. No tensor of all scores is built.

    Returns:
        ``(lo, hi, extra)``: prune every weight with score < ``lo``, plus the first ``extra``
        weights (parameter order) with ``lo <= score < hi``; ``extra`` is non-zero only where
        scores tie at the threshold. The count is exact, so the achieved sparsity is within
        ``tolerance`` (and 1/total) of the target.
    """
    total = sum(m.weight.numel() for _, _, m in targets)
    want = round(sparsity * total)
    if want == 0:
        return 0.0, 0.0, 0
    g = torch.Generator().manual_seed(seed)
    sample_size = min(sample_size, total)  # a small model needs no 2^20-score sample
    sample = []
    for l, n, m in targets:
        k = max(1, round(sample_size * m.weight.numel() / total))
        idx = torch.randint(m.weight.numel(), (k,), generator=g).to(m.weight.device)
        sample.append(score_fn(l, n, m.weight).flatten()[idx].float().cpu())
    sample = torch.sort(torch.cat(sample)).values
    q = want / total
    margin = 8.0 * (q * (1 - q) / sample.numel()) ** 0.5 + 2.0 / sample.numel()
    lo_i, hi_i = int((q - margin) * sample.numel()), int((q + margin) * sample.numel()) + 1
    lo_t = float(sample[lo_i]) if lo_i > 0 else float("-inf")
    hi_t = float(sample[hi_i]) if hi_i < sample.numel() else float("inf")
    below, band = 0, []
    for l, n, m in targets:
        score = score_fn(l, n, m.weight)
        below += int((score < lo_t).sum())
        band.append(score[(score >= lo_t) & (score < hi_t)].float().cpu())
    band = torch.cat(band)
    rank = want - below  # how many of the band's smallest to prune
    if not 0 <= rank <= band.numel():
        return _bisect_threshold(score_fn, targets, want, int(tolerance * total * 0.5))
    if rank == 0:
        return lo_t, lo_t, 0
    value = float(torch.kthvalue(band, rank).values)
    strictly_below = below + int((band < value).sum())
    return value, float(torch.nextafter(torch.tensor(value), torch.tensor(float("inf")))), want - strictly_below


def threshold_masks(score_fn: ScoreFn, targets: list[Target], lo: float, hi: float, extra: int) -> Iterator[tuple[nn.Linear, torch.Tensor]]:
    """Boolean prune masks of a :func:`global_threshold` result, one matrix at a time."""
    for l, n, m in targets:
        score = score_fn(l, n, m.weight)
        mask = score < lo
        if extra > 0:
            tied = ((score >= lo) & (score < hi)).flatten().nonzero().squeeze(1)[:extra]
            mask.view(-1)[tied] = True
            extra -= tied.numel()
        yield m, mask


def per_matrix_masks(score_fn: ScoreFn, targets: list[Target], sparsity: float) -> Iterator[tuple[nn.Linear, torch.Tensor]]:
    """Prune the lowest ``round(sparsity * numel)`` scores of every matrix."""
    for l, n, m in targets:
        score = score_fn(l, n, m.weight).flatten()
        k = round(sparsity * score.numel())
        mask = torch.zeros_like(score, dtype=torch.bool)
        if k:
            mask[torch.sort(score, stable=True).indices[:k]] = True
        yield m, mask.view_as(m.weight)
