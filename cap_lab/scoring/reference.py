"""The reference scorer: exact causal head scores, the obvious way (paper Sec. 3.2, Eq. 1-2).

One masked forward of the whole model per head over the whole calibration set (L x H passes),
with the loss taken from the model's own full logits. It is slow, and that is its job: the
fast scorers (:mod:`cap_lab.scoring.exact`, :mod:`cap_lab.scoring.attribution`) are checked
against it. Masking zeroes the head's slice of the attention output just before ``o_proj``
(:func:`cap_lab.modeling.mask_heads`); no weight changes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cap_lab.calibration import CalibrationSet
from cap_lab.modeling import get_layout, mask_heads, model_device
from cap_lab.scoring.types import HeadScores, aggregate_scores, check_aggregate, subset_mean_losses


def label_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy of full logits over target tokens, per row.

    Args:
        logits: (B, S, V) model outputs.
        labels: (B, S) token ids at target positions, -100 elsewhere.

    Returns:
        ``(loss_sum, count)``: each (B,), float64 sums of per-token CE and target-token counts.
    """
    shift_logits = logits[:, :-1].float()  # position t predicts token t+1
    shift_labels = labels[:, 1:]
    ce = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=-100, reduction="none",
    ).view(shift_labels.shape)
    valid = shift_labels != -100
    return (ce * valid).sum(dim=1).double(), valid.sum(dim=1).double()


@torch.inference_mode()
def item_loss_sums(model: nn.Module, calib: CalibrationSet, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward every calibration item; returns per-item target loss sums and counts, (N,) each."""
    n = len(calib.items)
    sums = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64)
    device = model_device(model)
    for batch in calib.batches(list(range(n)), batch_size, device):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        s, c = label_loss_sums(logits, batch.labels)
        idx = torch.tensor(batch.items)
        sums[idx], counts[idx] = s.cpu(), c.cpu()
    return sums, counts


def intact_subset_losses(model: nn.Module, calib: CalibrationSet, batch_size: int = 8) -> torch.Tensor:
    """(K,) mean target loss per subset of the unmasked model."""
    return subset_mean_losses(calib, *item_loss_sums(model, calib, batch_size))


def score_heads_reference(
    model: nn.Module, calib: CalibrationSet, *, aggregate: str = "median", batch_size: int = 8, progress: bool = True
) -> HeadScores:
    """Exact causal scores, the obvious way: one masked pass over the calibration set per head.

    Args:
        model: a supported causal LM (unchanged on return).
        calib: the calibration set with its K subsets.
        aggregate: ``median`` (paper) or ``mean``.
        batch_size: calibration items per forward.
        progress: show a progress bar over heads.

    Returns:
        :class:`HeadScores` with (L, H) scores.
    """
    check_aggregate(aggregate)
    layout = get_layout(model)
    intact = intact_subset_losses(model, calib, batch_size)
    masked = torch.zeros(calib.config.n_subsets, layout.num_layers, layout.num_heads, dtype=torch.float64)
    bar = tqdm(total=layout.num_layers * layout.num_heads, desc="scoring heads (reference)", disable=not progress)
    for layer in range(layout.num_layers):
        for head in range(layout.num_heads):
            mask = torch.ones(layout.num_heads)
            mask[head] = 0.0
            with mask_heads(model, {layer: mask}, layout):
                masked[:, layer, head] = subset_mean_losses(calib, *item_loss_sums(model, calib, batch_size))
            bar.update()
    bar.close()
    masked, intact = masked.float(), intact.float()  # stored precision, so cached == fresh
    return HeadScores(aggregate_scores(masked, intact, aggregate), masked, intact, aggregate)
