"""Causal head scores: the result type and Eq. 2 (paper Sec. 3.2).

For head h of layer l, with the calibration set split into K disjoint subsets D_1..D_K and
L(M; D_k) the token-level mean target cross-entropy of model M on subset k::

    s_{l,h} = median_k L(M with head (l,h) masked; D_k)  -  mean_k L(M; D_k)

``aggregate="mean"`` replaces the median by the mean (the paper's Sec. 6 ablation). For even K
the median is the mean of the two middle values.

With few subsets the two terms use different statistics of the same K losses, so every score
carries about the same offset ``median_k L(M; D_k) - mean_k L(M; D_k)``: on the default model
with the ``cpu`` profile's calibration set (K=3, intact losses 2.60, 2.20, 2.10) it is -0.10
nats, and most heads score below zero although masking them raises the loss. The offset drops
out of the min-max importance factors (Eq. 3), so pruning is unaffected; read signs with it in
mind, or compare ``masked_losses`` with ``intact_losses`` per subset.

This module imports nothing else from :mod:`cap_lab.scoring`; every scorer imports it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from cap_lab.calibration import CalibrationSet

AGGREGATES = ("median", "mean")


@dataclass(frozen=True)
class HeadScores:
    """Causal scores of every head, with what made them.

    Attributes:
        scores: (L, H) causal scores (Eq. 2); higher means masking hurts more.
        masked_losses: (K, L, H) mean target loss of each subset with each head masked
            (for ``attribution``: the intact loss plus the first-order estimate of the change).
        intact_losses: (K,) mean target loss of each subset, nothing masked.
        aggregate: ``median`` or ``mean`` over subsets.
        settings: model identity, calibration config, method and versions.
    """

    scores: torch.Tensor
    masked_losses: torch.Tensor
    intact_losses: torch.Tensor
    aggregate: str = "median"
    settings: dict = field(default_factory=dict)

    def with_aggregate(self, aggregate: str) -> "HeadScores":
        """The same losses aggregated with ``median`` or ``mean``."""
        return replace(self, aggregate=aggregate, scores=aggregate_scores(self.masked_losses, self.intact_losses, aggregate))

    def per_subset(self) -> torch.Tensor:
        """(K, L, H) single-subset estimates: masked loss minus that subset's intact loss."""
        return self.masked_losses - self.intact_losses.view(-1, 1, 1)


def check_aggregate(aggregate: str) -> None:
    """Raise ``ValueError`` unless ``aggregate`` is one of :data:`AGGREGATES`."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate={aggregate!r}; allowed: {', '.join(AGGREGATES)}")


def aggregate_scores(masked_losses: torch.Tensor, intact_losses: torch.Tensor, aggregate: str = "median") -> torch.Tensor:
    """Eq. 2. masked_losses: (K, L, H); intact_losses: (K,). Returns (L, H)."""
    check_aggregate(aggregate)
    masked = masked_losses.double()
    central = torch.quantile(masked, 0.5, dim=0) if aggregate == "median" else masked.mean(dim=0)
    return (central - intact_losses.double().mean()).float()


def subset_mean_losses(calib: CalibrationSet, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-item loss sums (N,) and target counts (N,) -> (K,) token-level subset means."""
    subset = torch.tensor([it.subset for it in calib.items])
    k = calib.config.n_subsets
    total = torch.zeros(k, dtype=torch.float64).index_add_(0, subset, sums.double().cpu())
    n = torch.zeros(k, dtype=torch.float64).index_add_(0, subset, counts.double().cpu())
    return total / n
