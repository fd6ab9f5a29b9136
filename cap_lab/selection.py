"""Choosing which weights to prune from their scores (paper Sec. 3.3, "Global threshold selection").

Pure functions over ``(layer, projection, module)`` targets and a score function
``(layer, projection, W) -> scores of W's shape``; nothing here changes a weight
(:func:`cap_lab.pruning.apply_pruning_masks` does). Scores are computed one matrix at a time,
so no tensor of all scores is ever built.

* :func:`global_threshold`: one threshold over every matrix that prunes exactly the target
  count (a sampled bracket, then an exact order statistic inside it; bisection as fallback);
  ties at the threshold are taken in parameter order;
* :func:`threshold_masks`: the boolean masks of such a threshold;
* :func:`per_matrix_masks`: the same sparsity in every matrix (or one per decoder layer);
* :func:`per_layer_threshold_masks`: one threshold per decoder layer, each pruning exactly its
  layer's share (a per-layer sparsity from :mod:`cap_lab.sparsity_allocation`, e.g. OWL);
* :func:`row_prune_mask` / :func:`per_row_masks`: the lowest ``int(in * s)`` scores of every
  output row (Wanda's per-output comparison group, Sun et al. 2024, Sec. 3);
* :func:`nm_prune_mask` / :func:`nm_masks`: N:M semi-structured sparsity (Mishra et al., 2021,
  "Accelerating Sparse Deep Neural Networks", the 2:4 pattern of NVIDIA Ampere sparse tensor
  cores; used for LLMs by SparseGPT, Frantar & Alistarh 2023, and Wanda, Sun et al. 2024, in
  their semi-structured extensions): in every row of an (out, in) matrix and every group of M consecutive input
  columns, the N highest scores are kept and the M - N others pruned, so the sparsity is
  exactly (M - N) / M whatever the scores. Any score works: ``|W|`` (magnitude),
  ``|W| * ||X_j||`` (Wanda's ``prune_n``/``prune_m``), CAP's Eq. 4 ``|W| * I``, seeded noise;
* :func:`select_masks`: the one dispatch over these that :func:`cap_lab.pruning.prune_model`
  uses for its score-based methods.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import nn

ScoreFn = Callable[[int, str, torch.Tensor], torch.Tensor]
SELECTION_SCOPES = ("global", "matrix", "row")
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


def _layer_share(sparsity: float | Sequence[float], layer: int) -> float:
    return float(sparsity) if isinstance(sparsity, (int, float)) else float(sparsity[layer])


def per_matrix_masks(score_fn: ScoreFn, targets: list[Target],
                     sparsity: float | Sequence[float]) -> Iterator[tuple[nn.Linear, torch.Tensor]]:
    """Prune the lowest ``round(s * numel)`` scores of every matrix.

    Args:
        score_fn: ``(layer, projection, W) -> scores`` of W's shape.
        targets: the prunable matrices.
        sparsity: one fraction for every matrix, or one per decoder layer (indexed by layer).
    """
    for l, n, m in targets:
        score = score_fn(l, n, m.weight).flatten()
        k = round(_layer_share(sparsity, l) * score.numel())
        mask = torch.zeros_like(score, dtype=torch.bool)
        if k:
            mask[torch.sort(score, stable=True).indices[:k]] = True
        yield m, mask.view_as(m.weight)


def per_layer_threshold_masks(score_fn: ScoreFn, targets: list[Target], layer_sparsity: Sequence[float],
                              tolerance: float = 1e-4) -> Iterator[tuple[nn.Linear, torch.Tensor]]:
    """One :func:`global_threshold` per decoder layer, over that layer's matrices only.

    Layer l loses exactly ``round(layer_sparsity[l] * numel of layer l)`` weights; only the
    scores inside a layer compete (a global method such as CAP then ranks each layer's weights
    against each other, not against other layers').
    """
    for layer in sorted({l for l, _, _ in targets}):
        mine = [t for t in targets if t[0] == layer]
        lo, hi, extra = global_threshold(score_fn, mine, float(layer_sparsity[layer]), tolerance)
        yield from threshold_masks(score_fn, mine, lo, hi, extra)


def row_prune_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """(out, in) scores -> (out, in) bool mask, True = prune: the lowest ``int(in * sparsity)``
    of every row (a stable sort: among equal scores the earlier column goes first).

    Example:
        >>> row_prune_mask(torch.tensor([[4., 1., 3., 2.], [1., 2., 3., 4.]]), 0.5)
        tensor([[False,  True, False,  True],
                [ True,  True, False, False]])
    """
    k = int(score.shape[1] * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.sort(score, dim=-1, stable=True).indices[:, :k], True)
    return mask


def per_row_masks(score_fn: ScoreFn, targets: list[Target],
                  sparsity: float | Sequence[float]) -> Iterator[tuple[nn.Linear, torch.Tensor]]:
    """:func:`row_prune_mask` of every matrix, at one sparsity or one per decoder layer."""
    for l, n, m in targets:
        yield m, row_prune_mask(score_fn(l, n, m.weight), _layer_share(sparsity, l))


# ------------------------------------------------------------------ N:M semi-structured sparsity
def check_nm(nm: tuple[int, int]) -> tuple[int, int]:
    """Validate an N:M pattern ``(n, m)``: keep n of every m, with integers 0 < n < m.

    Raises:
        ValueError: naming the bad pattern.
    """
    try:
        n, m = nm
    except (TypeError, ValueError):
        raise ValueError(f"nm={nm!r}: give (N, M), e.g. (2, 4) for 2:4") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)) or not 0 < n < m:
        raise ValueError(f"nm={nm!r}: N:M needs integers 0 < N < M (keep N of every M consecutive inputs), e.g. 2:4, 4:8")
    return n, m


def nm_sparsity(nm: tuple[int, int]) -> float:
    """The exact sparsity of an N:M pattern, (M - N) / M."""
    n, m = check_nm(nm)
    return (m - n) / m


def nm_and_sparsity(nm: tuple[int, int] | None, sparsity: float | None,
                    default: float = 0.2) -> tuple[tuple[int, int] | None, float]:
    """Reconcile an N:M pattern with a sparsity: ``(nm as a tuple or None, the sparsity)``.

    Without ``nm`` the sparsity is ``sparsity`` (``default`` when ``None``). With ``nm`` it is
    exactly (M - N) / M: ``sparsity`` may be omitted (``None``) or equal to it.

    Raises:
        ValueError: a bad pattern, or a sparsity that conflicts with the pattern.
    """
    if nm is None:
        return None, default if sparsity is None else sparsity
    n, m = check_nm(tuple(nm) if isinstance(nm, list) else nm)
    implied = (m - n) / m
    if sparsity is not None and abs(float(sparsity) - implied) > 1e-9:
        raise ValueError(f"sparsity={sparsity!r} conflicts with nm={n}:{m}, which prunes exactly (M - N) / M = "
                         f"{implied:g}; omit the sparsity or give {implied:g}")
    return (n, m), implied


def check_nm_shapes(targets: list[Target], m: int) -> None:
    """Every matrix's input width must be a multiple of ``m``; checked before anything is pruned.

    Raises:
        ValueError: naming the first matrix (layer, projection) and its (out, in) shape.
    """
    for l, n, mod in targets:
        if mod.weight.shape[1] % m:
            raise ValueError(f"N:M sparsity with M={m}: layer {l} {n} has shape {tuple(mod.weight.shape)} "
                             f"(out, in), and in={mod.weight.shape[1]} is not a multiple of M")


def nm_prune_mask(score: torch.Tensor, n: int, m: int, name: str = "matrix") -> torch.Tensor:
    """N:M selection on one matrix: (out, in) scores -> (out, in) bool mask, True = prune.

    In every row and every group of ``m`` consecutive columns the ``m - n`` lowest scores are
    pruned (a stable sort: among equal scores the earlier column goes first).

    Example:
        >>> nm_prune_mask(torch.tensor([[4., 1., 3., 2.]]), 2, 4)
        tensor([[False,  True, False,  True]])
    """
    check_nm((n, m))
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M sparsity with M={m}: {name} has shape {tuple(score.shape)} (out, in), "
                         f"and in={cols} is not a multiple of M")
    groups = score.reshape(rows, cols // m, m)  # (out, in/M, M)
    pruned = torch.sort(groups, dim=-1, stable=True).indices[..., : m - n]  # (out, in/M, M-N)
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, pruned, True).view(rows, cols)


def nm_masks(score_fn: ScoreFn, targets: list[Target], nm: tuple[int, int]) -> Iterator[tuple[nn.Linear, torch.Tensor]]:
    """:func:`nm_prune_mask` of every matrix; all shapes are checked before the first mask is made."""
    n, m = check_nm(nm)
    check_nm_shapes(targets, m)
    return ((mod, nm_prune_mask(score_fn(l, name, mod.weight), n, m, f"layer {l} {name}")) for l, name, mod in targets)


def nm_group_nonzeros(weight: torch.Tensor, m: int) -> torch.Tensor:
    """(out, in) weight -> (out, in/M) count of non-zeros in each group of M consecutive inputs."""
    rows, cols = weight.shape
    if cols % m:
        raise ValueError(f"weight of shape {tuple(weight.shape)}: in={cols} is not a multiple of M={m}")
    return (weight != 0).reshape(rows, cols // m, m).sum(dim=-1)


# ------------------------------------------------------------------ dispatch
def select_masks(score_fn: ScoreFn, targets: list[Target], sparsity: float, *, scope: str = "global",
                 nm: tuple[int, int] | None = None, layer_sparsity: Sequence[float] | None = None,
                 tolerance: float = 1e-4) -> tuple[Iterator[tuple[nn.Linear, torch.Tensor]], float | None]:
    """The masks of a score-based method (CAP, magnitude, random).

    Args:
        score_fn: ``(layer, projection, W) -> scores``.
        targets: the prunable matrices.
        sparsity: the target fraction (ignored when ``nm`` or ``layer_sparsity`` is given).
        scope: ``global`` (one threshold over all matrices; one per layer with
            ``layer_sparsity``), ``matrix`` (the same fraction of every matrix) or ``row`` (the
            same fraction of every output row, :func:`per_row_masks`).
        nm: an N:M pattern ``(n, m)``; overrides ``sparsity`` and ``scope``.
        layer_sparsity: (L,) one fraction per decoder layer (OWL), instead of ``sparsity``.
        tolerance: of the global threshold.

    Returns:
        ``(masks, threshold)``: masks one matrix at a time; the global threshold, or ``None``
        when there is not exactly one.
    """
    if scope not in SELECTION_SCOPES:
        raise ValueError(f"scope={scope!r}; allowed: {', '.join(SELECTION_SCOPES)}")
    if nm is not None:
        if layer_sparsity is not None:
            raise ValueError("nm and layer_sparsity together: an N:M pattern fixes every layer at (M - N) / M")
        return nm_masks(score_fn, targets, nm), None
    if layer_sparsity is not None:
        layers = sorted({l for l, _, _ in targets})
        if len(layer_sparsity) <= layers[-1]:
            raise ValueError(f"{len(layer_sparsity)} layer sparsities for {layers[-1] + 1} decoder layers")
    share = sparsity if layer_sparsity is None else layer_sparsity  # one fraction, or one per layer
    if scope == "matrix":
        return per_matrix_masks(score_fn, targets, share), None
    if scope == "row":
        return per_row_masks(score_fn, targets, share), None
    if layer_sparsity is not None:
        return per_layer_threshold_masks(score_fn, targets, layer_sparsity, tolerance), None
    lo, hi, extra = global_threshold(score_fn, targets, sparsity, tolerance)
    return threshold_masks(score_fn, targets, lo, hi, extra), lo
