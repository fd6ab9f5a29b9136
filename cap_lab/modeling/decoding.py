"""Forward passes with a KV cache, for evaluation (greedy decoding, log-likelihoods, perplexity).

Generation and option scoring reuse a prompt's keys and values across calls. transformers keeps
them in a cache object whose keyword changed name (``past_key_values`` up to 5.23, ``cache``
from 5.24, the old name deprecated until 5.40), as did the output field that returns it. This
module is the one place that knows: :func:`cache_keyword` reads the installed signature, and
:func:`lm_forward` / :func:`decoder_forward` return ``(result, cache)`` whatever the release.
Copying and row selection of a cache go through :func:`repeat_cache` and :func:`select_cache`.

:func:`decoder_forward` runs the base decoder (embeddings, layers, final norm) without the LM
head, so callers apply the head only where they need a prediction (:mod:`cap_lab.modeling.head`).
"""
from __future__ import annotations

import copy
import functools
import inspect

import torch
from torch import nn

from cap_lab.modeling.layout import ModelLayout


@functools.lru_cache(maxsize=None)
def _keyword_of(forward) -> str:
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_keyword(module: nn.Module) -> str:
    """The keyword ``module.forward`` takes its KV cache by (``cache`` or ``past_key_values``)."""
    return _keyword_of(type(module).forward)


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def lm_forward(model: nn.Module, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, cache=None, logits_to_keep: int = 0):
    """The causal LM's forward with caching on. ids (B, T) -> ``(logits (B, T or keep, V), cache)``."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=logits_to_keep, **{cache_keyword(model): cache})
    return out.logits, _returned_cache(out)


def decoder_forward(model: nn.Module, layout: ModelLayout, input_ids: torch.Tensor, *,
                    attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                    cache=None, use_cache: bool = False):
    """The base decoder without the LM head. ids (B, T) -> ``(final-norm outputs (B, T, d), cache)``.

    With ``use_cache=False`` no cache is built and the returned cache is ``None``.
    """
    decoder = layout.decoder(model)
    kwargs = {cache_keyword(decoder): cache} if use_cache or cache is not None else {}
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=use_cache or cache is not None, **kwargs)
    return out.last_hidden_state, _returned_cache(out) if use_cache or cache is not None else None


def repeat_cache(cache, copies: int):
    """A copy of a batch-1 cache with each row repeated ``copies`` times (the original is unchanged)."""
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(copies)
    return out


def select_cache(cache, rows: torch.Tensor) -> None:
    """Keep (and repeat, if listed twice) the cache rows ``rows`` (R,), in place."""
    cache.batch_select_indices(rows)
