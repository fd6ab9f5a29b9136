"""CAP's weight scores (paper Sec. 3.3, Eq. 3-4) and their variants; pure functions.

* :func:`importance_factors` (Eq. 3): ``I = 1 + 9 (s - min s) / (max s - min s)`` in [1, 10],
  over all heads of the model, all 1 when every score is equal;
* :func:`region_factors`: q rows and o columns of query head h get ``I[l, h]``; k/v rows of
  key/value head g the mean (``kv_reduce="mean"``) or max of the factors of the query heads
  sharing g under GQA; the MLP projections either the layer's mean head factor (the paper) or,
  given per-neuron factors, neuron j's factor on its ``gate_proj``/``up_proj`` row j and its
  ``down_proj`` column j (:func:`neuron_importance_factors`: Eq. 3 over all neurons of the
  model, from :mod:`cap_lab.scoring.neurons`);
* :func:`cap_score_fn` (Eq. 4): ``|W| * I``, or, activation-aware, ``|W_ij| * ||X_j||_2 * I``
  (Wanda's statistic, :func:`cap_lab.wanda.wanda_score`, times CAP's factor), as a
  ``(layer, projection, W) -> scores`` function for :mod:`cap_lab.selection`.

Nothing here changes a weight (:func:`cap_lab.pruning.apply_pruning_masks` does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from cap_lab.modeling import ModelLayout
from cap_lab.selection import ScoreFn
from cap_lab.wanda import wanda_score

KV_REDUCE = ("mean", "max")
MLP_FACTORS = ("layer_mean", "neuron")


def importance_factors(scores: torch.Tensor, unit: str = "head") -> torch.Tensor:
    """Eq. 3: (L, H) causal scores -> (L, H) factors in [1, 10] (all 1 if scores are equal).

    Args:
        scores: (L, H) head scores, or (L, I) neuron scores (``unit="neuron"``).
        unit: what a score belongs to, for the error message (``head`` or ``neuron``).

    Raises:
        ValueError: a score is NaN or infinite (it would silently void or distort every factor).
    """
    s = scores.double()
    bad = (~torch.isfinite(s)).nonzero().tolist()
    if bad:
        tag = "H" if unit == "head" else "N"
        where = ", ".join(f"L{l}{tag}{h}={float(s[l, h])}" for l, h in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise ValueError(f"{len(bad)} {unit} score(s) are NaN or infinite ({where}); scores must be finite")
    lo, hi = s.min(), s.max()
    if hi == lo:
        return torch.ones_like(s, dtype=torch.float32)
    return (1.0 + 9.0 * (s - lo) / (hi - lo)).float()


def neuron_importance_factors(neuron_scores: Sequence[torch.Tensor], layout: ModelLayout,
                              widths: Sequence[int]) -> torch.Tensor:
    """Eq. 3 over every MLP neuron of the model: L tensors (I,) -> (L, I) factors in [1, 10].

    Args:
        neuron_scores: one (I,) tensor of causal neuron scores per decoder layer (or an (L, I) tensor).
        layout: the model's layout (for L).
        widths: (L,) each layer's intermediate size I (``down_proj.in_features``).

    Raises:
        ValueError: a wrong number or shape of tensors, or a score that is not finite.
    """
    rows = list(neuron_scores)
    if len(rows) != layout.num_layers:
        raise ValueError(f"{len(rows)} neuron score tensors for {layout.num_layers} decoder layers; give one per layer")
    for l, (row, width) in enumerate(zip(rows, widths)):
        if tuple(row.shape) != (width,):
            raise ValueError(f"neuron scores of layer {l} have shape {tuple(row.shape)}; expected ({width},)")
    if len(set(widths)) != 1:
        raise ValueError(f"MLP widths differ across layers ({sorted(set(widths))}); one intermediate size is needed")
    return importance_factors(torch.stack([r.detach().cpu() for r in rows]), unit="neuron")


@dataclass(frozen=True)
class RegionFactor:
    """The factor of every weight of one matrix: by ``rows`` (out,), by ``cols`` (in,), or a ``scalar``."""

    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    scalar: float | None = None

    def expand(self, weight: torch.Tensor) -> torch.Tensor:
        """A factor broadcastable to ``weight`` (out, in)."""
        if self.rows is not None:
            return self.rows.to(weight.device).view(-1, 1)
        if self.cols is not None:
            return self.cols.to(weight.device).view(1, -1)
        return torch.tensor(self.scalar, device=weight.device)


def region_factors(factors: torch.Tensor, layout: ModelLayout, kv_reduce: str = "mean",
                   neuron_factors: torch.Tensor | None = None) -> dict[tuple[int, str], RegionFactor]:
    """Map (L, H) head factors onto every prunable matrix, keyed ``(layer, projection)``.

    Args:
        factors: (L, H) head factors (:func:`importance_factors`).
        layout: the model's layout.
        kv_reduce: ``mean`` or ``max`` over the query heads sharing a k/v head.
        neuron_factors: (L, I) neuron factors (:func:`neuron_importance_factors`): ``gate_proj``
            and ``up_proj`` row j and ``down_proj`` column j get neuron j's; ``None``: every MLP
            weight gets the layer's mean head factor (the paper).
    """
    if kv_reduce not in KV_REDUCE:
        raise ValueError(f"kv_reduce={kv_reduce!r}; allowed: {', '.join(KV_REDUCE)}")
    d = layout.head_dim
    out = {}
    for l in range(layout.num_layers):
        f = factors[l].float()  # (H,)
        grouped = f.view(layout.num_kv_heads, layout.group_size)  # (KV, H/KV), repeat_kv order
        kv = grouped.mean(dim=1) if kv_reduce == "mean" else grouped.max(dim=1).values  # (KV,)
        out[(l, "q_proj")] = RegionFactor(rows=f.repeat_interleave(d))
        out[(l, "k_proj")] = RegionFactor(rows=kv.repeat_interleave(d))
        out[(l, "v_proj")] = RegionFactor(rows=kv.repeat_interleave(d))
        out[(l, "o_proj")] = RegionFactor(cols=f.repeat_interleave(d))
        if neuron_factors is None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                out[(l, name)] = RegionFactor(scalar=float(f.mean()))
        else:
            n = neuron_factors[l].float()  # (I,)
            out[(l, "gate_proj")] = RegionFactor(rows=n)  # gate/up: (I, d), row j feeds neuron j
            out[(l, "up_proj")] = RegionFactor(rows=n)
            out[(l, "down_proj")] = RegionFactor(cols=n)  # down: (d, I), column j reads neuron j
    return out


def cap_score_fn(head_scores: torch.Tensor, layout: ModelLayout, kv_reduce: str = "mean", *,
                 neuron_factors: torch.Tensor | None = None,
                 input_sq_sums: Mapping[tuple[int, str], torch.Tensor] | None = None) -> ScoreFn:
    """Eq. 4 as a function ``(layer, projection, W) -> |W| * I`` (float32, W's shape).

    Args:
        head_scores: (L, H) causal head scores.
        layout: the model's layout.
        kv_reduce: see :func:`region_factors`.
        neuron_factors: (L, I) per-neuron factors for the MLP weights (see :func:`region_factors`).
        input_sq_sums: ``{(layer, projection): (in,) sum of squares of the inputs}``: the
            activation-aware score ``|W_ij| * ||X_j||_2 * I`` (Wanda's
            :func:`~cap_lab.wanda.wanda_score` times the factor); ``None``: ``|W| * I``.
    """
    regions = region_factors(importance_factors(head_scores), layout, kv_reduce, neuron_factors)
    if input_sq_sums is None:
        return lambda layer, name, w: w.detach().abs().float() * regions[(layer, name)].expand(w)
    return lambda layer, name, w: wanda_score(w, input_sq_sums[(layer, name)]) * regions[(layer, name)].expand(w)
