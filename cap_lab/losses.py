"""Target-token cross-entropy, the quantity every CAP score is built from (paper Eq. 1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def target_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over target tokens, per row.

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
