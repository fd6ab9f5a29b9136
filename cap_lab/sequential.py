"""Layer-by-layer pruning on the already-pruned prefix: the loop Wanda and SparseGPT share.

Wanda (Sun et al., 2024; locuslab/wanda ``prune_wanda``) and SparseGPT (Frantar & Alistarh,
2023; IST-DASLab/sparsegpt ``opt_sequential``) prune a decoder one layer at a time: the
statistics of layer l (Wanda's input-feature norms, SparseGPT's Hessian ``2 X X^T``) are taken
from the inputs that the model with layers 0..l-1 *already pruned* gives it, so each layer
sees the error its predecessors introduced. This module is
that loop, written once; a method supplies two things:

* ``new_statistics(modules)``: an accumulator with ``add(name, x, token_mask)``, called once per
  calibration batch with each linear's input ``x`` (B, S, in) and the batch's (B, S) mask of real
  (non-padding) tokens, while the layer runs on its inputs *before* it is pruned;
* ``prune_layer(layer, modules, statistics) -> int``: prunes the layer's linears from those
  statistics (through :mod:`cap_lab.pruning`'s mutation functions) and returns how many weights
  it selected.

How it runs: one intact pass captures the hidden states entering layer 0 and every layer's
call arguments (:func:`cap_lab.modeling.capture`); then, for each layer, every calibration
batch runs through it twice: once with input hooks (:func:`cap_lab.modeling.capture_inputs`) to
collect the statistics, then (after pruning) once more to produce the inputs of the next layer.
Given a :class:`~cap_lab.modeling.LayerOnloader` (``execution_device``, opened by the caller),
each layer is held on the execution device while it is measured, pruned and replayed.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Protocol, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from cap_lab.calibration import CalibrationSet
from cap_lab.modeling import LayerOnloader, ModelLayout, call_layer, capture, capture_inputs, model_device


class LayerStatistics(Protocol):
    """What a method accumulates over the calibration inputs of one decoder layer's linears."""

    def add(self, name: str, x: torch.Tensor, token_mask: torch.Tensor) -> None:
        """Take one batch: ``x`` (B, S, in) entering linear ``name``, ``token_mask`` (B, S), 1 = real token."""


Stats = TypeVar("Stats", bound=LayerStatistics)


@torch.inference_mode()
def prune_layers_sequentially(model: nn.Module, layout: ModelLayout, calib: CalibrationSet,
                              new_statistics: Callable[[dict[str, nn.Linear]], Stats],
                              prune_layer: Callable[[int, dict[str, nn.Linear], Stats], int], *, batch_size: int = 8,
                              progress: bool = True, onloader: LayerOnloader | None = None,
                              desc: str = "layers") -> int:
    """Prune every decoder layer in order, each from statistics of the already-pruned prefix.

    Args:
        model: a supported causal LM (pruned in place by ``prune_layer``).
        layout: its layout.
        calib: the calibration set.
        new_statistics: ``modules -> accumulator`` for one layer (``{projection name: linear}``).
        prune_layer: ``(layer index, modules, accumulator) -> weights selected``.
        batch_size: calibration items per forward.
        progress: progress bar over the layers.
        onloader: hold each layer on this onloader's device while it is processed (``None``:
            run where the model is).
        desc: the progress bar's label.

    Returns:
        The total number of weights selected.
    """
    device = model_device(model)
    states = []  # per batch: [hidden (B, S, d) entering the current layer, layer kwargs, attention mask (B, S)]
    for batch in calib.batches(list(range(len(calib.items))), batch_size, device):
        captured = capture(model, layout, batch.input_ids, batch.attention_mask, start=0, compute=False)
        states.append([captured.hidden, captured.layer_kwargs, batch.attention_mask])
    layers = layout.layers(model)
    selected = 0
    for layer in tqdm(range(layout.num_layers), desc=desc, disable=not progress):
        modules = {n: m for l, n, m in layout.linear_weights(model) if l == layer}
        statistics = new_statistics(modules)
        current = {}
        with onloader.hold(layer) if onloader else nullcontext():  # measured, pruned and replayed on one device
            with capture_inputs(modules, lambda name, x: statistics.add(name, x, current["mask"])):
                for hidden, kwargs, mask in states:
                    current["mask"] = mask
                    call_layer(layers[layer], hidden, kwargs[layer])
            selected += prune_layer(layer, modules, statistics)
            for state in states:  # the pruned layer feeds the next one
                state[0] = call_layer(layers[layer], state[0], state[1][layer])
    return selected
