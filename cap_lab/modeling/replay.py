"""Replaying decoder layers from a captured intact pass (used by exact scoring, attribution, Wanda).

Masking a head of layer l (paper Sec. 3.2) changes nothing in layers 0..l-1, so a scorer can
keep the hidden states entering layer l from one intact pass and run only layers l..L-1 per
masked head; Wanda (layer-by-layer pruning) likewise runs one layer at a time. For that the
layers must be called with exactly the arguments the model's own forward gives them: the
attention mask of their layer type (causal or sliding-window), the rotary embeddings (Gemma-3
has a separate local one for its sliding layers), the position ids, and whatever a later
transformers release adds. Rather than rebuilding those (which would copy transformers' mask
and rotary code and drift from the installed version), :func:`capture` runs the model forward
once with a ``forward_pre_hook`` (``with_kwargs=True``) on every decoder layer and keeps the
keyword arguments each layer received, and :func:`run_layers` passes them back untouched.

Nothing here knows the *names* of those arguments, so a release that renames or adds one
(transformers 5.24 renamed ``past_key_values`` to ``cache``) needs no change. Their *values*
are checked instead (:func:`check_layer_call`): plain values, tensors and tuples of tensors
are replayed; a KV-cache object or ``use_cache=True`` is refused, since a replay must have no
side effects. Then, the first time per model, :func:`verify_replay` replays the captured batch
from layer 0, twice stacked, and requires the captured final hidden states back (relative
error 1e-5 in float32); anything else raises :class:`ReplayError` naming the transformers
version, so a release that changes how layers are called fails loudly instead of computing
something different.

Several masked copies of a batch run in one forward by stacking it n times (block k of ``B``
rows is copy k): tensors of two or more dimensions whose leading size is ``B`` are stacked to
match, leading size 1 broadcasts, and 1-D tensors (e.g. ``cache_position``) pass unchanged.
"""
from __future__ import annotations

import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from cap_lab.modeling.hooks import StopForward
from cap_lab.modeling.layout import ModelLayout

#: relative tolerance of :func:`verify_replay` per dtype (float32: the issue's 1e-5)
REPLAY_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9, torch.bfloat16: 3e-2, torch.float16: 5e-3}
_VERIFIED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class ReplayError(RuntimeError):
    """The installed transformers calls its decoder layers in a way cap_lab cannot replay."""


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def _fail(what: str) -> ReplayError:
    return ReplayError(f"{what} (transformers {transformers_version()}); cap_lab cannot replay its decoder layers "
                       "faithfully. Use scoring method 'reference', or report this transformers version.")


def _is_cache(value) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - every supported release has it
        return False
    return isinstance(value, Cache)


def check_layer_call(index: int, args: tuple, kwargs: dict) -> None:
    """Raise :class:`ReplayError` unless a captured call is ``layer(hidden, **replayable values)``."""
    if len(args) != 1 or not isinstance(args[0], torch.Tensor) or "hidden_states" in kwargs:
        raise _fail(f"decoder layer {index} was called with positional arguments "
                    f"{[type(a).__name__ for a in args]} (expected the hidden states only)")
    for name, value in kwargs.items():
        if _is_cache(value):
            raise _fail(f"decoder layer {index} got a KV cache object in {name!r} although caching is off")
        if name == "use_cache" and value:
            raise _fail(f"decoder layer {index} was asked to use a cache")
        ok = (value is None or isinstance(value, (bool, int, float, str, torch.Tensor))
              or (isinstance(value, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in value)))
        if not ok:
            raise _fail(f"decoder layer {index} got {name!r} of type {type(value).__name__}; only tensors, tuples "
                        "of tensors and plain values can be replayed (use attn_implementation 'sdpa' or 'eager')")


@dataclass
class Capture:
    """What one intact forward of a batch leaves for replays.

    Attributes:
        hidden: (B, S, d) hidden states entering layer ``start``.
        layer_kwargs: per layer, the keyword arguments the model passed to it.
        final: (B, S, d) hidden states entering the final norm (attached to the autograd
            graph when grad is enabled); ``None`` when the capture skipped the layers after
            ``start``.
    """

    hidden: torch.Tensor
    layer_kwargs: list[dict]
    final: torch.Tensor | None


@contextmanager
def _passthrough(layer: nn.Module, first_output: dict):
    """While active, ``layer`` returns its input hidden states in the format of ``first_output["out"]``.

    The forward pre-hooks still run (they record the arguments); only the computation is
    skipped. An instance-level ``forward`` (accelerate's offload hooks) is put back afterwards.
    """
    own = vars(layer).get("forward")

    def forward(hidden, *args, **kwargs):
        out = first_output["out"]
        return hidden if isinstance(out, torch.Tensor) else (hidden, *out[1:])

    layer.forward = forward
    try:
        yield
    finally:
        if own is None:
            del layer.forward
        else:
            layer.forward = own


def capture(model: nn.Module, layout: ModelLayout, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            start: int = 0, site_hooks: Mapping[str, Callable[[int, torch.Tensor], torch.Tensor]] | None = None,
            compute: bool = True) -> Capture:
    """Run the model forward once, capturing every layer's arguments; stops before the LM head.

    Args:
        model: a supported causal LM.
        layout: its layout.
        input_ids: (B, S) right-padded token ids.
        attention_mask: (B, S) 1 for real tokens, or ``None``.
        start: the layer whose input hidden states to keep.
        site_hooks: optional ``{site: fn(layer, x) -> x}``, run on the input of that site
            (:data:`cap_lab.modeling.layout.HOOK_SITES`: ``o_proj``, ``down_proj``) in every
            layer (attribution patching).
        compute: ``False`` runs only the layers before ``start`` (at least layer 0, whose
            output format the others copy); every later layer records its arguments and
            returns its input unchanged, and ``final`` is ``None``. For callers that replay
            every layer themselves (sequential pruning): it saves most of a forward. A model's
            first capture always computes, so that it is verified.

    Returns:
        A :class:`Capture`. The first capture of each model also runs :func:`verify_replay`.
    """
    layers = layout.layers(model)
    if not 0 <= start < layout.num_layers:
        raise ValueError(f"start layer {start} out of range [0, {layout.num_layers})")
    skip_from = layout.num_layers if compute or model not in _VERIFIED else max(start, 1)
    calls: dict[int, tuple[tuple, dict]] = {}
    captured, first_output = {}, {}

    def on_layer(index):
        def hook(module, args, kwargs):
            calls[index] = (args, kwargs)
        return hook

    def on_norm(module, args):
        captured["final"] = args[0]
        raise StopForward  # skip the LM head over every position

    with ExitStack() as stack:
        for i, layer in enumerate(layers):
            stack.callback(layer.register_forward_pre_hook(on_layer(i), with_kwargs=True).remove)
            if i >= skip_from:
                stack.enter_context(_passthrough(layer, first_output))
        if skip_from < layout.num_layers:
            stack.callback(layers[0].register_forward_hook(lambda m, a, out: first_output.update(out=out)).remove)
        stack.callback(layout.final_norm(model).register_forward_pre_hook(on_norm).remove)
        for site, fn in (site_hooks or {}).items():
            for i in range(layout.num_layers):
                hook = (lambda m, args, _i=i, _fn=fn: (_fn(_i, args[0]),) + tuple(args[1:]))
                stack.callback(layout.hook_site(model, i, site).register_forward_pre_hook(hook).remove)
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
    if len(calls) != layout.num_layers or "final" not in captured:
        raise _fail(f"the forward reached {len(calls)} of {layout.num_layers} decoder layers"
                    f"{'' if 'final' in captured else ' and skipped the final norm'}")
    for i in range(layout.num_layers):
        check_layer_call(i, *calls[i])
    result = Capture(hidden=calls[start][0][0], layer_kwargs=[calls[i][1] for i in range(layout.num_layers)],
                     final=captured["final"] if skip_from == layout.num_layers else None)
    if model not in _VERIFIED:
        verify_replay(model, layout, calls[0][0][0], result)
    return result


def _stack(t: torch.Tensor, batch_rows: int, copies: int, name: str, memo: dict) -> torch.Tensor:
    if t.dim() < 2 or t.shape[0] == 1:
        return t  # 1-D (per position) or broadcast over rows
    if t.shape[0] != batch_rows:
        raise _fail(f"layer argument {name!r} has leading size {t.shape[0]}; expected {batch_rows} rows or 1")
    if id(t) not in memo:  # layers of one type share their mask: stack it once
        memo[id(t)] = t.repeat(copies, *([1] * (t.dim() - 1)))  # (copies * B, ...): block k is copy k
    return memo[id(t)]


def stack_layer_kwargs(kwargs: dict, batch_rows: int, copies: int, memo: dict | None = None) -> dict:
    """A layer's kwargs for ``copies`` stacked copies of a ``batch_rows``-row batch."""
    if copies == 1:
        return kwargs
    memo = {} if memo is None else memo
    out = {}
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            value = _stack(value, batch_rows, copies, name, memo)
        elif isinstance(value, (tuple, list)):
            value = type(value)(_stack(t, batch_rows, copies, name, memo) for t in value)
        out[name] = value
    return out


def call_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder layer; hidden (R, S, d) -> (R, S, d). Accepts tensor and tuple outputs."""
    out = layer(hidden, **kwargs)
    if isinstance(out, tuple):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.shape != hidden.shape:
        raise _fail(f"{type(layer).__name__} returned {type(out).__name__}; expected hidden states of shape "
                    f"{tuple(hidden.shape)}")
    return out


def run_layers(model: nn.Module, layout: ModelLayout, hidden: torch.Tensor, start: int, stop: int,
               layer_kwargs: list[dict], batch_rows: int | None = None) -> torch.Tensor:
    """Layers ``start..stop-1`` on hidden (copies * B, S, d), with the captured per-layer kwargs.

    Args:
        model: the causal LM the kwargs were captured from.
        layout: its layout.
        hidden: (R, S, d) hidden states entering layer ``start``; R = copies * B.
        start, stop: the layer range.
        layer_kwargs: :attr:`Capture.layer_kwargs`.
        batch_rows: B, the captured batch's rows (default R: one copy).

    Returns:
        (R, S, d) hidden states leaving layer ``stop - 1`` (the final-norm input when stop = L).
    """
    if not 0 <= start <= stop <= layout.num_layers:
        raise ValueError(f"layer range [{start}, {stop}) outside [0, {layout.num_layers}]")
    rows = batch_rows or hidden.shape[0]
    copies, rest = divmod(hidden.shape[0], rows)
    if rest:
        raise ValueError(f"hidden has {hidden.shape[0]} rows, not a multiple of batch_rows={rows}")
    layers, memo = layout.layers(model), {}
    for index in range(start, stop):
        hidden = call_layer(layers[index], hidden, stack_layer_kwargs(layer_kwargs[index], rows, copies, memo))
    return hidden


@torch.no_grad()
def verify_replay(model: nn.Module, layout: ModelLayout, first_hidden: torch.Tensor, captured: Capture) -> None:
    """Replay a capture from layer 0 (two stacked copies) and require the captured final states.

    Raises:
        ReplayError: the replay differs by more than :data:`REPLAY_TOLERANCE` (relative to the
            largest final hidden value), naming the transformers version.
    """
    final = captured.final.detach()
    rows = final.shape[0]
    replayed = run_layers(model, layout, first_hidden.detach().repeat(2, 1, 1), 0, layout.num_layers,
                          captured.layer_kwargs, batch_rows=rows)
    scale = float(final.abs().max().clamp(min=1.0))
    error = max(float((replayed[k * rows:(k + 1) * rows] - final).abs().max()) for k in range(2)) / scale
    tolerance = REPLAY_TOLERANCE.get(final.dtype, 1e-5)
    if not error <= tolerance:
        raise _fail(f"replaying {type(model).__name__}'s decoder layers from layer 0 gives final hidden states "
                    f"that differ from its own forward by {error:.3g} (relative; allowed {tolerance:g})")
    _VERIFIED.add(model)
