"""Attribution patching: a first-order estimate of every head's causal score from one backward.

Masking head h of layer l sets its slice z_h of the ``o_proj`` input to zero. To first order
the loss then changes by ``-(dL/dz_h . z_h)``: one forward and one backward pass give that
estimate for every head at once (Syed, Rager & Conmy 2023, "Attribution patching"; Nanda's
"attribution patching" note), instead of the L x H masked passes of the exact score
(paper Sec. 3.2, :mod:`cap_lab.scoring.exact`).

Per subset k, with L_k the token-level mean target loss of the subset, the estimate of the
loss change is ``Delta_k(l, h) = -sum_{tokens of D_k} dL_k/dz_{l,h} . z_{l,h}`` (the gradient of
the subset *mean*, so the sum over tokens is already averaged like L_k). It is stored as the
masked loss ``L_k(intact) + Delta_k`` so that :func:`cap_lab.scoring.types.aggregate_scores` averages
it exactly like the exact score (median over subsets minus the mean intact loss); were the
loss linear in z, the two scores would coincide.

**This is an approximation.** It is exact only for a loss linear in the head's output. It is
known to fail where the loss is far from linear over the step from z_h to 0:

* saturated attention and softmax outputs (a head whose removal flips a near-one-hot
  attention pattern or prediction downstream: the local gradient is ~0 while the effect is
  large, so important heads can look unimportant);
* large ablations: zeroing a head is not a small perturbation when its output norm is large
  (heads feeding norms, "attention sinks", early layers), and second-order terms dominate;
* heads whose effects cancel or compensate each other (backup heads) nonlinearly.

Use it to rank heads cheaply and check it against the exact scores with
:func:`cap_lab.scoring.compare.compare_scores`; CAP's pruning uses the exact scores by default.

With a :mod:`torch.distributed` process group (:mod:`cap_lab.distributed`, torchrun), the batches
are split across ranks and the per-item estimates and loss sums summed across them (each item
is on one rank only, so every rank gets the one-process result). Nothing is saved midway: a
failed run is rerun whole (it is one forward and one backward per batch).

Scoring changes no weight and leaves no ``.grad``: gradients are taken with
``torch.autograd.grad`` with respect to the ``o_proj`` inputs only (a leaf is made only where an
input does not already require grad); parameters are never asked for gradients.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from cap_lab import distributed
from cap_lab.calibration import CalibrationSet
from cap_lab.modeling import TargetTokens, capture, get_layout, model_device, target_loss_sums
from cap_lab.scoring.types import HeadScores, aggregate_scores, check_aggregate, subset_mean_losses


def score_heads_attribution(model: nn.Module, calib: CalibrationSet, *, aggregate: str = "median", batch_size: int = 8,
                            progress: bool = True) -> HeadScores:
    """First-order (attribution patching) estimates of the causal head scores.

    Args:
        model: a supported causal LM (weights, ``requires_grad`` flags and ``.grad`` unchanged).
        calib: the calibration set with its K subsets.
        aggregate: ``median`` (paper) or ``mean`` over subsets.
        batch_size: calibration items per forward and backward.
        progress: progress bar over batches.

    Returns:
        :class:`cap_lab.scoring.types.HeadScores` whose ``masked_losses`` are intact loss plus the
        linear estimate (see the module docstring for where that estimate fails).
    """
    check_aggregate(aggregate)
    layout = get_layout(model)
    device = model_device(model)
    n_items, k = len(calib.items), calib.config.n_subsets
    subset = torch.tensor([it.subset for it in calib.items])
    # predicted target tokens per item (a target at position 0 has no predictor)
    counts = torch.tensor([float(len(it.input_ids) - max(it.target_start, 1)) for it in calib.items], dtype=torch.float64)
    subset_tokens = torch.zeros(k, dtype=torch.float64).index_add_(0, subset, counts)
    weight = 1.0 / subset_tokens[subset]  # (N,): d L_k / d (item loss sum)
    estimate = torch.zeros(n_items, layout.num_layers, layout.num_heads, dtype=torch.float64)
    intact_sums = torch.zeros(n_items, dtype=torch.float64)
    batches = list(calib.batches(list(range(n_items)), batch_size, device))
    rank, world_size = distributed.world()
    distributed.check_same_on_all_ranks("calibration set", calib.token_digest())
    with torch.inference_mode(False), torch.enable_grad():
        for batch in tqdm(distributed.my_share(batches, rank, world_size), desc="scoring heads (attribution)",
                          disable=not progress or rank != 0):
            z: dict[int, torch.Tensor] = {}

            def keep(layer: int, x: torch.Tensor) -> torch.Tensor:  # x: (B, S, H * D)
                if not x.requires_grad:
                    x = x.detach().requires_grad_(True)  # nothing upstream needs grad: cut nothing
                z[layer] = x
                return x

            captured = capture(model, layout, batch.input_ids, batch.attention_mask, 0, site_hooks={"o_proj": keep})
            rows = batch.input_ids.shape[0]
            items = torch.tensor(batch.items)
            sums = target_loss_sums(model, layout, captured.final, TargetTokens.from_labels(batch.labels), rows)[0]  # (B,)
            objective = (sums * weight[items].to(sums.device)).sum()
            grads = torch.autograd.grad(objective, [z[l] for l in range(layout.num_layers)])
            for layer, g in enumerate(grads):
                gz = (g.double() * z[layer].detach().double()).view(rows, -1, layout.num_heads, layout.head_dim)  # (B, S, H, D)
                estimate[items, layer] = -gz.sum(dim=(1, 3)).cpu()
            intact_sums[items] = sums.detach().cpu()
            del captured, z, grads, objective
    if world_size > 1:  # each item is non-zero on exactly one rank, so the sums are exact
        distributed.barrier()
        distributed.sum_across_ranks(estimate)
        distributed.sum_across_ranks(intact_sums)
    intact = subset_mean_losses(calib, intact_sums, counts)  # (K,) float64
    delta = torch.zeros(k, layout.num_layers, layout.num_heads, dtype=torch.float64).index_add_(0, subset, estimate)
    masked = (intact.view(-1, 1, 1) + delta).float()
    intact = intact.float()
    return HeadScores(aggregate_scores(masked, intact, aggregate), masked, intact, aggregate,
                      {"method": "attribution", "batches": len(batches), "ranks": world_size})
