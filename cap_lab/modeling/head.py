"""The language-model head, written once: final norm, LM head, logit soft-capping, chunked log-probs.

Every number cap_lab derives from a model's predictions goes through here: the causal scores'
target cross-entropy (paper Eq. 1), log-likelihood accuracy, WikiText-2 perplexity. A causal
LM's ``forward`` applies the LM head to every position, which for a 49k-vocabulary model and
a 2048-token window is a 400 MB logits tensor per row; these functions apply it only where a
prediction is needed, ``max_rows`` positions at a time, so at most ``max_rows x vocab`` logits
are alive. Gemma-2/3's ``final_logit_softcapping`` is applied where the config sets it.

Cross-entropy is ``-log_softmax(logits)[target]`` in float32 (float64 sums), the same quantity
``torch.nn.functional.cross_entropy`` computes; the tests check it against the model's own
``forward`` logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cap_lab.modeling.layout import ModelLayout

DEFAULT_MAX_ROWS = 512


@dataclass(frozen=True)
class TargetTokens:
    """Where a batch's targets are predicted. rows, positions, labels: (T,) each.

    Position ``positions[t]`` of row ``rows[t]`` predicts token ``labels[t]`` (the next one).
    """

    rows: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_labels(cls, labels: torch.Tensor) -> "TargetTokens":
        """From (B, S) labels: the token id at target positions, -100 elsewhere."""
        shifted = labels[:, 1:]  # (B, S-1): label predicted at each position
        rows, positions = (shifted != -100).nonzero(as_tuple=True)
        return cls(rows, positions, shifted[rows, positions])


def lm_logits(model: nn.Module, layout: ModelLayout, normed: torch.Tensor) -> torch.Tensor:
    """LM head (and soft-capping) on final-norm outputs: (..., d) -> (..., V)."""
    logits = layout.lm_head(model)(normed)
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma-2/3
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def token_logprobs(model: nn.Module, layout: ModelLayout, normed: torch.Tensor, targets: torch.Tensor,
                   max_rows: int = DEFAULT_MAX_ROWS) -> torch.Tensor:
    """log p(target | position) from final-norm outputs, ``max_rows`` rows of logits at a time.

    Args:
        model: the causal LM.
        layout: its layout.
        normed: (N, d) final-norm outputs, each predicting the next token.
        targets: (N,) the tokens that followed.
        max_rows: rows of logits materialized at once.

    Returns:
        (N,) float32 log-probabilities.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows={max_rows}; must be >= 1")
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=normed.device)
    for lo in range(0, targets.shape[0], max_rows):
        logits = lm_logits(model, layout, normed[lo: lo + max_rows]).float()  # (c, V)
        logp = torch.log_softmax(logits, dim=-1)
        out[lo: lo + max_rows] = logp.gather(-1, targets[lo: lo + max_rows, None].to(logp.device))[:, 0]
    return out


def target_loss_sums(model: nn.Module, layout: ModelLayout, final: torch.Tensor, targets: TargetTokens,
                     batch_rows: int, max_rows: int = DEFAULT_MAX_ROWS) -> torch.Tensor:
    """Summed target cross-entropy per row, from the hidden states entering the final norm.

    Args:
        model: the causal LM.
        layout: its layout.
        final: (n * B, S, d) final-norm inputs of ``n`` stacked copies of a batch.
        targets: the batch's target tokens.
        batch_rows: B.
        max_rows: at most this many (rows, vocab) logits at a time.

    Returns:
        (n, B) float64 loss sums.
    """
    n = final.shape[0] // batch_rows
    picked = final.view(n, batch_rows, *final.shape[1:])[:, targets.rows, targets.positions]  # (n, T, d)
    picked = layout.final_norm(model)(picked.reshape(-1, final.shape[-1]))  # (n * T, d)
    ce = -token_logprobs(model, layout, picked, targets.labels.repeat(n), max_rows).double().view(n, -1)  # (n, T)
    sums = ce.new_zeros(n, batch_rows)
    return sums.index_add_(1, targets.rows.to(ce.device), ce)
