"""How much two sets of head scores agree: ranks, top heads, and the pruning they lead to.

Used to check a cheap scorer (attribution patching, :mod:`cap_lab.scoring.attribution`) against the
exact causal scores (paper Sec. 3.2), or two calibration settings against each other. Rank
agreement alone can hide what matters for CAP, so :func:`compare_scores` also reports the
fraction of prunable weights that CAP (Sec. 3.3, Eq. 3-4) would prune differently at a given
sparsity under the two score sets. That last figure needs the model's weights; the model is
only read (masks are computed, never applied).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from cap_lab.modeling import get_layout
from cap_lab.cap_scores import cap_score_fn
from cap_lab.selection import global_threshold, threshold_masks


@dataclass(frozen=True)
class ScoreAgreement:
    """Agreement of two (L, H) score tensors.

    Attributes:
        spearman: Spearman rank correlation over all heads.
        kendall: Kendall tau-b over all heads.
        top_overlap: fraction of the top ``top_k`` heads of ``a`` that are also top in ``b``.
        top_k: number of heads in the top fraction.
        pruned_differently: fraction of prunable weights that CAP prunes under one score set
            and not the other at ``sparsity`` (``None`` when no model was given).
        sparsity: the sparsity of that comparison.
    """

    spearman: float
    kendall: float
    top_overlap: float
    top_k: int
    pruned_differently: float | None
    sparsity: float

    def to_dict(self) -> dict:
        return asdict(self)


def _as_scores(x) -> torch.Tensor:
    t = getattr(x, "scores", x)  # HeadScores or a tensor
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"expected HeadScores or an (L, H) tensor, got {type(x).__name__} "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else ''}")
    if not torch.isfinite(t).all():
        raise ValueError("scores contain NaN or infinite values")
    return t.detach().double().cpu()


def top_head_set(scores: torch.Tensor, k: int) -> set[int]:
    """Flat indices (layer * H + head) of the ``k`` highest scores (ties: lower index first)."""
    return set(torch.argsort(scores.flatten(), descending=True, stable=True)[:k].tolist())


@torch.no_grad()
def pruned_differently(a: torch.Tensor, b: torch.Tensor, model: nn.Module, sparsity: float = 0.2,
                       kv_reduce: str = "mean") -> float:
    """Fraction of prunable weights on which CAP's masks under scores ``a`` and ``b`` differ."""
    layout = get_layout(model)
    targets = layout.linear_weights(model)
    total = sum(m.weight.numel() for _, _, m in targets)
    masks = []
    for scores in (a, b):
        fn = cap_score_fn(scores.float(), layout, kv_reduce)
        masks.append(threshold_masks(fn, targets, *global_threshold(fn, targets, sparsity)))
    differ = sum(int((ma ^ mb).sum()) for (_, ma), (_, mb) in zip(*masks))
    return differ / total


def compare_scores(a, b, model: nn.Module | None = None, *, sparsity: float = 0.2, top_fraction: float = 0.1,
                   kv_reduce: str = "mean") -> ScoreAgreement:
    """Rank and pruning agreement of two head-score sets.

    Args:
        a: :class:`cap_lab.scoring.types.HeadScores` or an (L, H) tensor (the reference, e.g. exact).
        b: the same for the other scorer.
        model: the model the scores belong to, for the pruning comparison (only read).
        sparsity: target sparsity of the pruning comparison (paper: 20% is the mildest level).
        top_fraction: fraction of heads in the top set.
        kv_reduce: how CAP maps query-head factors to shared key/value heads.

    Returns:
        A :class:`ScoreAgreement`.

    Example:
        >>> agreement = compare_scores(exact, approx, lm.model)
        >>> agreement.spearman, agreement.pruned_differently
    """
    from scipy.stats import kendalltau, spearmanr

    sa, sb = _as_scores(a), _as_scores(b)
    if sa.shape != sb.shape:
        raise ValueError(f"score shapes differ: {tuple(sa.shape)} vs {tuple(sb.shape)}")
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction={top_fraction}; must be in (0, 1]")
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity={sparsity}; must be in [0, 1)")
    x, y = sa.flatten().numpy(), sb.flatten().numpy()
    k = max(1, round(top_fraction * x.size))
    overlap = len(top_head_set(sa, k) & top_head_set(sb, k)) / k
    differ = pruned_differently(sa, sb, model, sparsity, kv_reduce) if model is not None else None
    return ScoreAgreement(spearman=float(spearmanr(x, y).statistic), kendall=float(kendalltau(x, y).statistic),
                          top_overlap=overlap, top_k=k, pruned_differently=differ, sparsity=sparsity)
