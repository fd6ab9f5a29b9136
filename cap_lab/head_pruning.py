"""Structural (head-level) CAP, the ablation of paper Sec. 6, "Weight-level vs. head-level pruning".

The paper compares CAP's weight-level pruning with "a structural variant that removes entire
heads based on causal scores" and finds it brittle, but does not define the variant precisely.
Method ``cap_heads`` (:func:`cap_lab.pruning.prune_model`) defines it as follows, at target
sparsity s and with the same (L, H) causal head scores as ``cap``:

* **Heads.** Every query head of the model is ranked by its causal score, lowest first (ties in
  (layer, head) order), across layers. Heads are removed in that order until the removed weights
  of ``q_proj`` and ``o_proj`` reach ``round(s * (all q_proj + o_proj weights))``: the first
  prefix of the ranking whose weights are at least that many (so the attention budget is met or
  exceeded by less than one head). Removing query head h of layer l zeroes its ``head_dim`` rows
  of ``q_proj`` (rows ``h*D .. (h+1)*D - 1``) and its ``head_dim`` input columns of ``o_proj``,
  so the head contributes nothing to the residual stream.
* **Key/value heads.** Under grouped-query attention key/value head g serves query heads
  ``g*G .. (g+1)*G - 1`` (G = H / KV, ``repeat_kv`` order). Its ``k_proj`` and ``v_proj`` rows are
  removed only when every one of those query heads is removed; otherwise they are kept whole.
* **MLP.** ``gate_proj``/``up_proj``/``down_proj`` are pruned as CAP prunes them: score
  ``|W| * I`` with I the layer's mean head factor (Eq. 3-4, :func:`cap_lab.cap_scores.cap_score_fn`),
  one threshold over all MLP weights of the model that prunes exactly ``round(s * MLP weights)``
  (:func:`cap_lab.selection.global_threshold`).

So the MLP sparsity is exactly s, the q/o sparsity is s rounded up to whole heads, and the k/v
sparsity is whatever whole groups were removed (often 0): the achieved global sparsity is close
to s but not exact; :class:`cap_lab.pruning.PruneResult` reports it. Biases are never touched
(a removed head's query bias is harmless: its ``o_proj`` columns are zero). No guard keeps a
layer from losing all its heads: that brittleness is what the ablation measures. N:M patterns
and OWL allocations are weight-level ideas and are refused with this method.

Everything here is pure: masks are returned, and :func:`cap_lab.pruning.apply_pruning_masks`
applies them. The head geometry comes from the adapter (:class:`cap_lab.modeling.ModelLayout`).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from cap_lab.cap_scores import cap_score_fn
from cap_lab.modeling import ModelLayout
from cap_lab.modeling.layout import MLP_PROJECTIONS
from cap_lab.selection import Target, select_masks

HEAD_METHOD = "cap_heads"


def check_head_pruning_options(nm: tuple[int, int] | None, owl: bool) -> None:
    """Refuse the weight-level options that have no meaning for whole-head removal.

    Raises:
        ValueError: naming ``nm`` or ``owl``.
    """
    if nm is not None:
        raise ValueError(f"method {HEAD_METHOD!r} with nm={nm[0]}:{nm[1]}: whole heads cannot follow an N:M "
                         f"pattern; use nm=None")
    if owl:
        raise ValueError(f"method {HEAD_METHOD!r} with owl=True: OWL allocates weight-level sparsity per layer; "
                         f"use owl=False")


def heads_to_remove(head_scores: torch.Tensor, layout: ModelLayout, head_sizes: torch.Tensor,
                    sparsity: float) -> torch.Tensor:
    """Which query heads to remove: the lowest-scoring prefix that reaches the q/o budget.

    Args:
        head_scores: (L, H) causal head scores.
        layout: the model's layout.
        head_sizes: (L, H) ``q_proj`` + ``o_proj`` weights of each head (``2 * D * hidden``).
        sparsity: target fraction s of all q/o weights.

    Returns:
        (L, H) bool, True = remove.
    """
    if tuple(head_scores.shape) != (layout.num_layers, layout.num_heads):
        raise ValueError(f"head_scores shape {tuple(head_scores.shape)}; expected ({layout.num_layers}, {layout.num_heads})")
    if not bool(torch.isfinite(head_scores).all()):
        raise ValueError("head scores must be finite; some are NaN or infinite")
    want = round(sparsity * int(head_sizes.sum()))
    order = torch.sort(head_scores.flatten().double(), stable=True).indices  # (L*H,) lowest first
    reached = torch.cumsum(head_sizes.flatten()[order], 0) >= want  # (L*H,)
    n_removed = 0 if want == 0 else int(reached.nonzero()[0]) + 1
    removed = torch.zeros(layout.num_layers * layout.num_heads, dtype=torch.bool)
    removed[order[:n_removed]] = True
    return removed.view(layout.num_layers, layout.num_heads)


def head_masks(removed: torch.Tensor, layout: ModelLayout, targets: list[Target]) -> Iterator[tuple[nn.Linear, torch.Tensor]]:
    """Prune masks of the attention projections for (L, H) ``removed`` heads (True = prune).

    q rows and o columns of every removed head; k/v rows of a key/value head whose whole group
    of query heads is removed.
    """
    d = layout.head_dim
    for l, name, m in targets:
        if name in MLP_PROJECTIONS:
            continue
        heads = removed[l]  # (H,)
        if name in ("k_proj", "v_proj"):
            heads = heads.view(layout.num_kv_heads, layout.group_size).all(dim=1)  # (KV,)
        units = heads.repeat_interleave(d).to(m.weight.device)  # (H*D,) or (KV*D,)
        mask = units.view(1, -1) if name == "o_proj" else units.view(-1, 1)
        yield m, mask.expand_as(m.weight).clone()


def head_pruning_masks(head_scores: torch.Tensor, layout: ModelLayout, targets: list[Target], sparsity: float,
                       tolerance: float = 1e-4) -> tuple[Iterator[tuple[nn.Linear, torch.Tensor]], float | None, torch.Tensor]:
    """The masks of ``cap_heads`` (see the module docstring).

    Args:
        head_scores: (L, H) causal head scores.
        layout: the model's layout.
        targets: every prunable matrix (:meth:`ModelLayout.linear_weights`).
        sparsity: target s.
        tolerance: of the MLP threshold search.

    Returns:
        ``(masks, mlp_threshold, removed)``: attention then MLP masks, one matrix at a time; the
        MLP threshold; the (L, H) bool removed heads.
    """
    sizes = torch.zeros(layout.num_layers, layout.num_heads, dtype=torch.long)
    for l, name, m in targets:
        if name == "q_proj":
            sizes[l] += layout.head_dim * m.in_features
        elif name == "o_proj":
            sizes[l] += m.out_features * layout.head_dim
    score_fn = cap_score_fn(head_scores, layout)  # Eq. 3-4; refuses non-finite scores, naming them
    removed = heads_to_remove(head_scores, layout, sizes, sparsity)
    mlp = [t for t in targets if t[1] in MLP_PROJECTIONS]
    mlp_masks, threshold = select_masks(score_fn, mlp, sparsity, tolerance=tolerance)

    def masks():
        yield from head_masks(removed, layout, targets)
        yield from mlp_masks

    return masks(), threshold, removed
