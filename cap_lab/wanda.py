"""Wanda (Sun et al., 2024, "A Simple and Effective Pruning Approach for Large Language Models").

Wanda scores each weight by its magnitude times the norm of its input feature over the
calibration tokens, ``|W_ij| * ||X_j||_2`` (paper Sec. 3, Eq. 1), and prunes the lowest scores
of every output row separately (the per-output comparison group, Sec. 3). Here:

* :class:`InputNormStatistics`: the per-feature sums of squares ``||X_j||^2`` over the
  non-padding tokens (Wanda's running mean differs by a constant factor, which leaves every
  row's order unchanged), accumulated by :func:`cap_lab.sequential.prune_layers_sequentially`
  on the already-pruned prefix, as locuslab/wanda does;
* :func:`wanda_row_mask`: the selection, the lowest ``int(in * s)`` of each row (stable sort),
  or with ``nm=(N, M)`` the N:M pattern on the same score (the reference's ``prune_n``/``prune_m``:
  in every group of M consecutive inputs of a row, the N highest scores are kept);
* :func:`wanda_score`: the score itself (also OWL's outlier statistic,
  :mod:`cap_lab.sparsity_allocation`).

Pure: nothing here changes a weight (:func:`cap_lab.pruning.apply_pruning_masks` does).
"""
from __future__ import annotations

import torch
from torch import nn

from cap_lab.selection import nm_prune_mask, row_prune_mask


def wanda_score(weight: torch.Tensor, input_norm_sq: torch.Tensor) -> torch.Tensor:
    """Eq. 1, ``|W_ij| * ||X_j||_2``: (out, in) weight, (in,) sum of squares -> (out, in) float32."""
    return weight.detach().abs().float() * input_norm_sq.float().to(weight.device).sqrt().view(1, -1)


def wanda_row_mask(weight: torch.Tensor, input_norm_sq: torch.Tensor, sparsity: float,
                   nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Wanda's per-output-row selection. weight: (out, in); input_norm_sq: (in,) sum of squares.

    Returns a (out, in) bool mask of the lowest ``int(in * sparsity)`` of ``|W| * ||X||`` per row,
    or, with ``nm``, of the M - N lowest of every group of M consecutive inputs of a row
    (``sparsity`` is then unused).
    """
    metric = wanda_score(weight, input_norm_sq)
    return nm_prune_mask(metric, *nm) if nm is not None else row_prune_mask(metric, sparsity)


class InputNormStatistics:
    """Wanda's statistic: per linear, (in,) float64 sums of squares of its inputs over real tokens.

    The accumulator that :func:`cap_lab.pruning.sequential_prune` gives
    :func:`cap_lab.sequential.prune_layers_sequentially` (which calls :meth:`add` per batch).
    """

    def __init__(self, modules: dict[str, nn.Linear]):
        self.sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in modules.items()}

    def add(self, name: str, x: torch.Tensor, token_mask: torch.Tensor) -> None:  # x: (B, S, in), mask (B, S)
        keep = token_mask.to(x.device, torch.float32).unsqueeze(-1)
        self.sums[name] += ((x.float() ** 2) * keep).sum(dim=(0, 1)).double().cpu()
