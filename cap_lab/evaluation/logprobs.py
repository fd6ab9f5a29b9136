"""Token log-probabilities without full-vocabulary logits for every position.

A causal LM's ``forward`` applies the language-model head to every position: for a 2048-token
window of a 49k-vocabulary model that is a 400 MB logits tensor per row. The scorers here run
the base model to its final hidden states (after the final norm), pick the positions they
need, and apply the head (with Gemma's final logit soft-capping where the config has it) in
chunks of ``chunk_size`` positions, keeping at most ``chunk_size x vocab`` logits alive.
:func:`logits_from_hidden` is checked against the model's own ``forward`` in the tests.
"""
from __future__ import annotations

import torch
from torch import nn


def base_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states of the base model, shape (B, T, d), for ids of shape (B, T).

    Right padding only (position ids count from the first column).
    """
    base = getattr(model, model.base_model_prefix)
    return base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head applied to final hidden states (..., d) -> (..., V), soft-capped if configured."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def token_logprobs(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = 512) -> torch.Tensor:
    """log p(target | hidden) for each row, computed ``chunk_size`` rows of logits at a time.

    Args:
        model: the causal LM whose head scores ``hidden``.
        hidden: (N, d) final hidden states, each predicting the next token.
        targets: (N,) the tokens that followed.
        chunk_size: rows of logits materialized at once.

    Returns:
        (N,) float32 log-probabilities.
    """
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    for lo in range(0, targets.shape[0], chunk_size):
        logits = logits_from_hidden(model, hidden[lo: lo + chunk_size]).float()  # (c, V)
        logp = torch.log_softmax(logits, dim=-1)
        out[lo: lo + chunk_size] = logp.gather(-1, targets[lo: lo + chunk_size, None].to(logp.device))[:, 0]
    return out
