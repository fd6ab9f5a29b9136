"""Layer-wise sparsity allocation: OWL (Yin et al., 2024, "Outlier Weighed Layerwise Sparsity
(OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity", ICML; reference code
luuyin/OWL).

OWL gives decoder layers that hold more activation outliers a lower sparsity, keeping the
average at the target:

1. **Outlier ratio** ``D_l`` of layer l: the fraction of its weights whose Wanda score
   ``|W_ij| * ||X_j||_2`` exceeds ``M`` times the mean score, where the mean is over all
   prunable matrices of the layer together (as the authors' code does; ``M = 5`` there).
   Input norms come from one dense forward over the calibration set: the authors measure
   every layer on the unpruned model, so no layer-by-layer replay is needed
   (:func:`input_sq_sums`, with Wanda's own accumulator and score from :mod:`cap_lab.wanda`).
2. **Allocation** (:func:`owl_layer_sparsities`): ``D`` is min-max scaled to ``[0, 2 lambda]``
   and subtracted from the target, then shifted so that the mean sparsity equals the target:
   ``s_l = S - 2 lambda (D_l - min D) / (max D - min D) + c``. The paper bounds every layer to
   ``[S - lambda, S + lambda]``; the authors' code (``c`` = the mean of the scaled ``D``) keeps
   that bound only when the ratios are spread evenly (one outlier-heavy layer among many gets
   ``S - 2 lambda (1 - 1/L)``). Here ``c`` is chosen so that the (numel-)weighted mean of
   ``clip(s_l, S - lambda, S + lambda)`` is the target: identical to the authors' result
   whenever theirs lies within the bound, and within the bound always. The lower end is
   floored at 0; ``S + lambda`` must stay below 1.

How each method then prunes layer l to ``s_l`` is :func:`cap_lab.pruning.prune_model`'s job
(per matrix, per row for Wanda, one threshold per layer for global-threshold methods).
Everything here except :func:`input_sq_sums` is pure.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from cap_lab.calibration import CalibrationSet
from cap_lab.modeling import ModelLayout, capture_inputs, model_device, onload_layers
from cap_lab.wanda import InputNormStatistics, wanda_score

OWL_LAMBDA = 0.08  # the authors' default (LLaMA scripts)
OWL_M = 5.0


def check_owl_settings(sparsity: float, lam: float, m: float, nm: tuple[int, int] | None = None) -> None:
    """Validate OWL's settings before any work.

    Raises:
        ValueError: ``lam`` < 0, ``sparsity + lam`` >= 1, ``m`` <= 0, or an N:M pattern ``nm``
            (which prunes every layer alike), naming the value.
    """
    if nm is not None:
        raise ValueError(f"owl with nm={nm[0]}:{nm[1]}: an N:M pattern prunes every layer to the same "
                         f"{(nm[1] - nm[0]) / nm[1]:g}; choose one")
    if not 0.0 <= lam < 1.0 or sparsity + lam >= 1.0:
        raise ValueError(f"owl_lambda={lam!r}: need lambda >= 0 and sparsity + lambda < 1 (sparsity={sparsity!r})")
    if not m > 0:
        raise ValueError(f"owl_m={m!r}; the outlier threshold multiple must be > 0")


# ------------------------------------------------------------------ input statistics (Wanda's)
@torch.inference_mode()
def input_sq_sums(model: nn.Module, layout: ModelLayout, calib: CalibrationSet, batch_size: int = 8,
                  execution_device: str | torch.device | None = None) -> dict[tuple[int, str], torch.Tensor]:
    """Per-feature input sums of squares of every prunable linear, from one dense forward.

    Args:
        model: a supported causal LM (not changed).
        layout: its layout.
        calib: the calibration set (padding tokens are left out).
        batch_size: calibration items per forward.
        execution_device: run with one decoder layer at a time on this device
            (:func:`cap_lab.modeling.offload.onload_layers`); ``None``: where the model is.

    Returns:
        ``{(layer, projection): (in,) float64}`` on the CPU.
    """
    modules = {f"{l}.{n}": m for l, n, m in layout.linear_weights(model)}
    stats = InputNormStatistics(modules)  # Wanda's accumulator, over every layer at once
    current = {}
    with ExitStack() as stack:
        if execution_device is not None:
            stack.enter_context(onload_layers(model, layout, execution_device))
        device = model_device(model)
        stack.enter_context(capture_inputs(modules, lambda key, x: stats.add(key, x, current["mask"])))
        for batch in calib.batches(list(range(len(calib.items))), batch_size, device):
            current["mask"] = batch.attention_mask  # (B, S)
            layout.decoder(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return {(int(key.split(".")[0]), key.split(".")[1]): s for key, s in stats.sums.items()}


# ------------------------------------------------------------------ outlier ratios (pure)
def outlier_ratio(scores: Sequence[torch.Tensor], m: float = OWL_M) -> float:
    """Fraction of all entries of ``scores`` (one layer's matrices) above ``m`` times their joint mean."""
    if not m > 0:
        raise ValueError(f"owl_m={m!r}; the outlier threshold multiple must be > 0")
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.double().sum()) for s in scores) / total
    return sum(int((s > m * mean).sum()) for s in scores) / total


def layer_outlier_ratios(model: nn.Module, layout: ModelLayout, sq_sums: dict[tuple[int, str], torch.Tensor],
                         m: float = OWL_M) -> torch.Tensor:
    """(L,) outlier ratio ``D_l`` of every decoder layer from its Wanda scores (see module docstring)."""
    by_layer: dict[int, list[torch.Tensor]] = {}
    for l, n, mod in layout.linear_weights(model):
        by_layer.setdefault(l, []).append(wanda_score(mod.weight, sq_sums[(l, n)]))
    return torch.tensor([outlier_ratio(by_layer[l], m) for l in range(layout.num_layers)], dtype=torch.float64)


# ------------------------------------------------------------------ allocation (pure)
def owl_layer_sparsities(outlier_ratios: Sequence[float] | torch.Tensor, target: float, lam: float = OWL_LAMBDA,
                         weights: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """OWL's per-layer sparsities from per-layer outlier ratios.

    Args:
        outlier_ratios: (L,) ``D_l`` >= 0 (fractions or percentages: only their order and
            relative spacing matter).
        target: the overall sparsity S, in [0, 1).
        lam: the bound lambda >= 0; every layer ends in ``[max(0, S - lam), S + lam]``.
        weights: (L,) positive layer sizes (prunable numel) for a weighted mean; ``None``:
            plain mean (the same when every layer has the same size).

    Returns:
        (L,) float64 sparsities whose weighted mean is ``target`` (to rounding), non-increasing
        in ``D`` (more outliers, lower sparsity).

    Example:
        >>> owl_layer_sparsities([0.0, 1.0, 2.0], 0.5, 0.1)
        tensor([0.6000, 0.5000, 0.4000], dtype=torch.float64)
    """
    d = torch.as_tensor(outlier_ratios, dtype=torch.float64).flatten()  # (L,)
    if d.numel() == 0 or not bool(torch.isfinite(d).all()) or bool((d < 0).any()):
        raise ValueError(f"outlier_ratios={d.tolist()}; need one finite value >= 0 per layer")
    if not 0.0 <= target < 1.0:
        raise ValueError(f"sparsity={target!r} is outside [0, 1)")
    check_owl_settings(target, lam, OWL_M)
    w = torch.ones_like(d) if weights is None else torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.shape != d.shape or not bool((w > 0).all()):
        raise ValueError(f"weights={w.tolist()}; need {d.numel()} positive layer sizes")
    w = w / w.sum()
    if lam == 0.0 or float(d.max()) == float(d.min()):
        return torch.full_like(d, float(target))
    raw = target - 2.0 * lam * (d - d.min()) / (d.max() - d.min())  # (L,) in [S - 2 lambda, S]
    lo, hi = max(0.0, target - lam), target + lam

    def mean_at(c: float) -> float:
        return float((w * (raw + c).clamp(lo, hi)).sum())

    a, b = lo - float(raw.max()), hi - float(raw.min())  # mean_at(a) = lo <= S <= hi = mean_at(b)
    for _ in range(200):  # bisection on the shift: mean_at is continuous and non-decreasing
        mid = (a + b) / 2
        if mid in (a, b):
            break
        a, b = (mid, b) if mean_at(mid) < target else (a, mid)
    return (raw + (a + b) / 2).clamp(lo, hi)


@dataclass(frozen=True)
class OWLAllocation:
    """Per-layer sparsities from OWL.

    Attributes:
        outlier_ratios: (L,) fraction of each layer's weights with Wanda score > m x mean.
        layer_sparsity: (L,) the sparsity each layer is pruned to.
        target: the overall sparsity (numel-weighted mean of ``layer_sparsity``).
        lam: the bound lambda.
        m: the outlier multiple M.
    """

    outlier_ratios: torch.Tensor
    layer_sparsity: torch.Tensor
    target: float
    lam: float
    m: float

    def to_dict(self) -> dict:
        return dict(outlier_ratios=self.outlier_ratios.tolist(), layer_sparsity=self.layer_sparsity.tolist(),
                    target=self.target, owl_lambda=self.lam, owl_m=self.m)


def owl_allocation(model: nn.Module, layout: ModelLayout, calib: CalibrationSet, target: float,
                   lam: float = OWL_LAMBDA, m: float = OWL_M, batch_size: int = 8,
                   execution_device: str | torch.device | None = None) -> OWLAllocation:
    """Measure the outlier ratios of ``model`` on ``calib`` and allocate ``target`` over its layers.

    The mean of the allocation is weighted by each layer's prunable numel, so the whole model's
    sparsity is the target (every layer of the supported families has the same size, where
    this is the authors' plain mean).
    """
    check_owl_settings(target, lam, m)  # bad settings fail before the forward
    ratios = layer_outlier_ratios(model, layout, input_sq_sums(model, layout, calib, batch_size, execution_device), m)
    sizes = [0] * layout.num_layers
    for l, _, mod in layout.linear_weights(model):
        sizes[l] += mod.weight.numel()
    return OWLAllocation(ratios, owl_layer_sparsities(ratios, target, lam, sizes), float(target), float(lam), float(m))
