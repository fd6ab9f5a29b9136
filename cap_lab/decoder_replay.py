"""Re-running a model's decoder layers from a cached prefix, and target-only losses.

Masking a head of layer l (paper Sec. 3.2) changes nothing in layers 0..l-1, so a scorer can
keep the hidden states entering layer l from one intact pass and run only layers l..L-1 per
masked head. For that the layers must be called with exactly the arguments the model's own
forward gives them: the attention mask of their layer type (causal or sliding-window), the
rotary embeddings (Gemma-3 has a separate local one for its sliding layers), the position ids.
Rather than rebuilding those (which would copy transformers' ``create_causal_mask``,
``create_sliding_window_causal_mask`` and rotary code, and silently drift from the installed
version), :func:`intact_pass` runs the model forward once with a ``forward_pre_hook``
(``with_kwargs=True``) on every decoder layer and keeps the keyword arguments each layer
received; :func:`run_layers` calls the layers again with them. The arguments are checked
against the ones this module understands (:data:`KNOWN_LAYER_PARAMETERS`); a transformers
version whose decoder layer takes anything else raises ``RuntimeError`` naming the version,
never computes something different.

Several masked copies of a batch run in one forward by stacking it n times (block k of
``B`` rows is copy k); :func:`repeat_layer_kwargs` stacks the per-row arguments to match.

The loss needs logits only where a target token is predicted, so :func:`target_loss_sums`
applies the final norm and ``lm_head`` to those positions only (in row chunks, so the
(tokens, vocab) logits stay within a memory budget) instead of building (B, S, V) logits.
"""
from __future__ import annotations

import inspect
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cap_lab.adapters import ModelLayout
from cap_lab.calibration import Batch
from cap_lab.hooks import StopForward

#: Parameters of ``DecoderLayer.forward`` that the replay understands (transformers 4.4x-5.x
#: Llama, Mistral, Qwen2/3, Gemma-2/3). Anything else makes :func:`check_layer_signature` raise.
KNOWN_LAYER_PARAMETERS = frozenset({
    "self", "hidden_states", "attention_mask", "position_ids", "position_embeddings", "past_key_values",
    "past_key_value", "use_cache", "cache_position", "output_attentions", "kwargs", "args",
})
#: Per-call keyword arguments whose tensors carry a batch dimension first (or 1 to broadcast).
_BATCHED = ("attention_mask", "position_ids", "position_embeddings")
#: Arguments that must be off for a replay to be side-effect free.
_MUST_BE_OFF = ("past_key_values", "past_key_value", "use_cache", "output_attentions")


def _version() -> str:
    import transformers

    return transformers.__version__


def check_layer_signature(layer: nn.Module) -> None:
    """Raise ``RuntimeError`` if ``layer.forward`` takes parameters the replay does not know."""
    params = set(inspect.signature(type(layer).forward).parameters)
    unknown = sorted(params - KNOWN_LAYER_PARAMETERS)
    if unknown or "hidden_states" not in params:
        raise RuntimeError(
            f"{type(layer).__name__}.forward of transformers {_version()} takes {sorted(params)}; "
            f"the fast scorer knows only {sorted(KNOWN_LAYER_PARAMETERS)} (unknown: {unknown}). "
            "Use method='reference', or teach cap_lab.decoder_replay this signature."
        )


def check_layer_call(layer: nn.Module, index: int, args: tuple, kwargs: dict) -> None:
    """Raise ``RuntimeError`` unless a captured call is ``layer(hidden, **known kwargs)``."""
    problem = None
    if len(args) != 1 or not isinstance(args[0], torch.Tensor) or "hidden_states" in kwargs:
        problem = f"positional arguments {[type(a).__name__ for a in args]} (expected the hidden states only)"
    elif set(kwargs) - KNOWN_LAYER_PARAMETERS:
        problem = f"unknown keyword arguments {sorted(set(kwargs) - KNOWN_LAYER_PARAMETERS)}"
    elif any(kwargs.get(k) not in (None, False) for k in _MUST_BE_OFF):
        on = sorted(k for k in _MUST_BE_OFF if kwargs.get(k) not in (None, False))
        problem = f"a cache or attention weights requested ({', '.join(on)})"
    else:
        mask = kwargs.get("attention_mask")
        pe = kwargs.get("position_embeddings")
        if mask is not None and not isinstance(mask, torch.Tensor):
            problem = f"attention_mask of type {type(mask).__name__} (use attn_implementation 'sdpa' or 'eager')"
        elif pe is not None and not (isinstance(pe, tuple) and all(isinstance(t, torch.Tensor) for t in pe)):
            problem = f"position_embeddings of type {type(pe).__name__}"
    if problem:
        raise RuntimeError(
            f"decoder layer {index} ({type(layer).__name__}) of transformers {_version()} was called with {problem}; "
            "the fast scorer cannot replay it faithfully. Use method='reference'."
        )


def _stack_rows(t: torch.Tensor, batch_rows: int, n: int, name: str, memo: dict) -> torch.Tensor:
    if t.shape[0] == 1:
        return t  # broadcasts over rows
    if t.shape[0] != batch_rows:
        raise RuntimeError(f"layer argument {name} has leading size {t.shape[0]}; expected {batch_rows} or 1")
    if id(t) not in memo:  # layers of one type share their mask: stack it once
        memo[id(t)] = t.repeat(n, *([1] * (t.dim() - 1)))  # (n * B, ...): block k is copy k
    return memo[id(t)]


def repeat_layer_kwargs(kwargs: dict, batch_rows: int, n: int, memo: dict | None = None) -> dict:
    """Layer kwargs for a batch of ``B`` rows stacked ``n`` times (``n * B`` rows).

    ``memo`` (id -> stacked tensor) shares the stacked copies between calls for several layers.
    """
    memo = {} if memo is None else memo
    out = dict(kwargs)
    for name in _BATCHED:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            out[name] = _stack_rows(value, batch_rows, n, name, memo)
        elif isinstance(value, tuple):
            out[name] = tuple(_stack_rows(t, batch_rows, n, name, memo) for t in value)
    return out


def call_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder layer; hidden (B, S, d) -> (B, S, d). Accepts 5.x tensor and 4.x tuple outputs."""
    out = layer(hidden, **kwargs)
    if isinstance(out, tuple):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.shape != hidden.shape:
        raise RuntimeError(f"{type(layer).__name__} of transformers {_version()} returned {type(out).__name__}; "
                           f"expected hidden states of shape {tuple(hidden.shape)}")
    return out


def run_layers(layout: ModelLayout, model: nn.Module, hidden: torch.Tensor, layer_kwargs: list[dict], first: int) -> torch.Tensor:
    """Layers ``first..L-1`` on hidden (R, S, d) with per-layer kwargs; returns the final-norm input."""
    layers = layout.layers(model)
    for index in range(first, layout.num_layers):
        hidden = call_layer(layers[index], hidden, layer_kwargs[index])
    return hidden


@dataclass
class IntactPass:
    """What one intact forward of a batch leaves for replays.

    Attributes:
        hidden: (B, S, d) hidden states entering layer ``start``.
        layer_kwargs: per layer, the keyword arguments the model passed to it.
        final: (B, S, d) hidden states entering the final norm (attached to the autograd
            graph when grad is enabled).
    """

    hidden: torch.Tensor
    layer_kwargs: list[dict]
    final: torch.Tensor


def intact_pass(model: nn.Module, layout: ModelLayout, batch: Batch, start: int = 0, o_proj_hook=None) -> IntactPass:
    """Run the model forward once, capturing layer arguments and hidden states; no ``lm_head``.

    Args:
        model: a supported causal LM.
        layout: its layout.
        batch: the right-padded batch.
        start: the layer whose input hidden states to keep.
        o_proj_hook: optional ``fn(layer, x) -> x`` run on each ``o_proj`` input (attribution).
    """
    layers = layout.layers(model)
    if not 0 <= start < layout.num_layers:
        raise ValueError(f"start layer {start} out of range [0, {layout.num_layers})")
    for layer_class in {type(layer) for layer in layers}:
        check_layer_signature(next(layer for layer in layers if type(layer) is layer_class))
    calls: dict[int, tuple[tuple, dict]] = {}
    captured = {}

    def on_layer(index):
        def hook(module, args, kwargs):
            calls[index] = (args, kwargs)
        return hook

    def on_norm(module, args):
        captured["final"] = args[0]
        raise StopForward  # skip lm_head over every position

    with ExitStack() as stack:
        for i, layer in enumerate(layers):
            stack.callback(layer.register_forward_pre_hook(on_layer(i), with_kwargs=True).remove)
        stack.callback(layout.final_norm(model).register_forward_pre_hook(on_norm).remove)
        if o_proj_hook is not None:
            for i in range(layout.num_layers):
                hook = (lambda m, args, _i=i: (o_proj_hook(_i, args[0]),) + tuple(args[1:]))
                stack.callback(layout.o_proj(model, i).register_forward_pre_hook(hook).remove)
        try:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        except StopForward:
            pass
    if len(calls) != layout.num_layers or "final" not in captured:
        raise RuntimeError(f"the forward of transformers {_version()} reached {len(calls)} of {layout.num_layers} "
                           "decoder layers or skipped the final norm; the fast scorer cannot replay it")
    for i in range(layout.num_layers):
        check_layer_call(layers[i], i, *calls[i])
    return IntactPass(hidden=calls[start][0][0], layer_kwargs=[calls[i][1] for i in range(layout.num_layers)],
                      final=captured["final"])


@dataclass(frozen=True)
class TargetTokens:
    """Where a batch's targets are predicted. rows, positions, labels: (T,) each.

    Position ``positions[t]`` of row ``rows[t]`` predicts token ``labels[t]`` (the next one).
    """

    rows: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def of(cls, batch: Batch) -> "TargetTokens":
        shifted = batch.labels[:, 1:]  # (B, S-1): label predicted at each position
        rows, positions = (shifted != -100).nonzero(as_tuple=True)
        return cls(rows, positions, shifted[rows, positions])


def _softcap(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma-2/3
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def target_loss_sums(model: nn.Module, layout: ModelLayout, final: torch.Tensor, targets: TargetTokens,
                     batch_rows: int, max_logit_rows: int = 4096) -> torch.Tensor:
    """Summed target cross-entropy per row, with logits at target positions only.

    Args:
        model: the causal LM (for its final norm, ``lm_head`` and logit soft-capping).
        layout: its layout.
        final: (n * B, S, d) hidden states entering the final norm, ``n`` stacked copies of a batch.
        targets: the batch's target tokens.
        batch_rows: B.
        max_logit_rows: at most this many (rows, vocab) logits at a time.

    Returns:
        (n, B) float64 loss sums.
    """
    n = final.shape[0] // batch_rows
    picked = final.view(n, batch_rows, *final.shape[1:])[:, targets.rows, targets.positions]  # (n, T, d)
    picked = picked.reshape(-1, final.shape[-1])  # (n * T, d)
    labels = targets.labels.repeat(n)  # (n * T,)
    norm, head = layout.final_norm(model), layout.lm_head(model)
    ce = []
    for start in range(0, picked.shape[0], max_logit_rows):
        logits = _softcap(model, head(norm(picked[start:start + max_logit_rows])))  # (rows, V)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        ce.append(F.cross_entropy(logits, labels[start:start + max_logit_rows], reduction="none"))
    ce = torch.cat(ce).view(n, -1).double() if ce else picked.new_zeros(n, 0, dtype=torch.float64)
    sums = ce.new_zeros(n, batch_rows)
    return sums.index_add_(1, targets.rows.to(ce.device), ce)
