"""Scoped forward hooks: head masking before ``o_proj``, neuron masking before ``down_proj``, input capture.

Head masking (paper Sec. 3.2, "Temporary head masking for scoring"): the attention output
entering ``o_proj`` is reshaped to ``(batch, seq, heads, head_dim)`` and multiplied by a
binary head mask, so a masked head contributes nothing to the output projection while the
attention pattern and every weight stay untouched. A mask may differ per batch row, which lets
one forward evaluate several masks on a repeated batch (as Causal Head Gating does).

Neuron masking does the same one level finer in the MLP: the intermediate activation entering
``down_proj``, (batch, seq, I) with one feature per neuron (``act(gate) * up`` in the gated
MLPs of every supported family), is multiplied by a per-neuron mask, so a masked neuron's
``down_proj`` column receives zero while its ``gate``/``up`` rows still run.

Every hook is added inside a context manager that removes its handles in ``finally``, even
when the forward raises; after the ``with`` block the model is exactly what it was.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from cap_lab.modeling.layout import ModelLayout, get_layout

#: layer index -> mask of shape (H,) (all rows) or (B, H) (one mask per batch row); 1 keeps, 0 masks
HeadMask = Mapping[int, torch.Tensor]


def _mask_hook(mask: torch.Tensor, num_heads: int, head_dim: int) -> Callable:
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]  # (B, S, H * D)
        batch, seq, _ = x.shape
        m = mask.to(device=x.device, dtype=x.dtype)
        if m.dim() == 2 and m.shape[0] != batch:
            raise ValueError(f"per-row head mask has {m.shape[0]} rows but the batch has {batch}")
        m = m.view(-1, 1, num_heads, 1)  # (1 or B, 1, H, 1)
        x = (x.view(batch, seq, num_heads, head_dim) * m).view(batch, seq, num_heads * head_dim)
        return (x,) + tuple(args[1:])

    return hook


def _as_layer_masks(head_mask: HeadMask | torch.Tensor, layout: ModelLayout) -> dict[int, torch.Tensor]:
    if isinstance(head_mask, torch.Tensor):  # (L, H) or (B, L, H)
        if head_mask.shape[-2:] != (layout.num_layers, layout.num_heads):
            raise ValueError(
                f"head mask of shape {tuple(head_mask.shape)}; expected (L, H) or (B, L, H) with "
                f"L={layout.num_layers}, H={layout.num_heads}"
            )
        return {l: head_mask[..., l, :] for l in range(layout.num_layers) if not bool((head_mask[..., l, :] == 1).all())}
    out = {}
    for layer, mask in head_mask.items():
        if not 0 <= layer < layout.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {layout.num_layers})")
        if mask.dim() not in (1, 2) or mask.shape[-1] != layout.num_heads:
            raise ValueError(f"mask for layer {layer} has shape {tuple(mask.shape)}; expected (H,) or (B, H), H={layout.num_heads}")
        out[int(layer)] = mask
    return out


@contextmanager
def mask_heads(model: nn.Module, head_mask: HeadMask | torch.Tensor, layout: ModelLayout | None = None) -> Iterator[None]:
    """Zero chosen heads' attention output before ``o_proj`` for the duration of the block.

    Args:
        model: a supported causal LM.
        head_mask: ``{layer: mask}`` with masks of shape (H,) or (B, H), or a dense tensor of
            shape (L, H) / (B, L, H). 1 keeps a head, 0 removes it (fractions scale it).
        layout: the model's layout (looked up when omitted).

    Example:
        >>> with mask_heads(model, {3: torch.tensor([1., 0., 1., 1.])}):
        ...     logits = model(input_ids).logits   # head 1 of layer 3 silenced
    """
    layout = layout or get_layout(model)
    masks = _as_layer_masks(head_mask, layout)
    handles = []
    try:
        for layer, mask in masks.items():
            o_proj = layout.o_proj(model, layer)
            handles.append(o_proj.register_forward_pre_hook(_mask_hook(mask, layout.num_heads, layout.head_dim)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _neuron_mask_hook(mask: torch.Tensor) -> Callable:
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]  # (B, S, I)
        m = mask.to(device=x.device, dtype=x.dtype)
        if m.dim() == 2 and m.shape[0] != x.shape[0]:
            raise ValueError(f"per-row neuron mask has {m.shape[0]} rows but the batch has {x.shape[0]}")
        return (x * m.view(-1, 1, x.shape[-1]),) + tuple(args[1:])  # mask (1 or B, 1, I)

    return hook


@contextmanager
def mask_neurons(model: nn.Module, neuron_mask: Mapping[int, torch.Tensor],
                 layout: ModelLayout | None = None) -> Iterator[None]:
    """Scale chosen MLP neurons' activations at the input of ``down_proj`` for the duration of the block.

    Args:
        model: a supported causal LM.
        neuron_mask: ``{layer: mask}`` with masks of shape (I,) or (B, I) (one per batch row),
            I = the layer's intermediate size. 1 keeps a neuron, 0 removes it (fractions scale it;
            a mask that requires grad gives the derivative of the loss in each neuron's scale).
        layout: the model's layout (looked up when omitted).

    Example:
        >>> mask = torch.ones(48); mask[7] = 0.0
        >>> with mask_neurons(model, {1: mask}):
        ...     logits = model(input_ids).logits   # neuron 7 of layer 1 silenced
    """
    layout = layout or get_layout(model)
    handles = []
    try:
        for layer, mask in neuron_mask.items():
            if not 0 <= layer < layout.num_layers:
                raise ValueError(f"layer {layer} out of range [0, {layout.num_layers})")
            down = layout.down_proj(model, layer)
            if mask.dim() not in (1, 2) or mask.shape[-1] != down.in_features:
                raise ValueError(f"neuron mask for layer {layer} has shape {tuple(mask.shape)}; expected (I,) or "
                                 f"(B, I), I={down.in_features}")
            handles.append(down.register_forward_pre_hook(_neuron_mask_hook(mask)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_inputs(modules: Mapping[str, nn.Module], callback: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call ``callback(name, input)`` with the first positional input of each module's forward."""
    def observer(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:  # returns None: the input is never replaced
            callback(name, args[0])
        return hook

    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(observer(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (the caller catches it)."""
