"""Layer-by-layer execution for models larger than one device (the SparseGPT onloading pattern).

SparseGPT (Frantar & Alistarh, 2023, Sec. 4 "Implementation") and llm-compressor's sequential
pipeline prune a model that does not fit on the accelerator by keeping it in CPU memory and
moving one decoder layer at a time to the device: the layer's inputs are already there, it
runs (and is pruned) there, and it goes back before the next one comes. Only the small modules
outside the layers (embeddings, rotary embeddings, final norm, LM head) stay on the device for
the whole run. Peak device memory is then one layer, the non-layer modules and the calibration
activations, instead of the whole model.

:func:`onload_layers` does this for any code that calls decoder layers through their normal
``__call__`` (:func:`cap_lab.modeling.replay.capture`, :func:`~cap_lab.modeling.replay.run_layers`,
Wanda's per-layer replay): it moves every parameter and buffer outside the decoder layers to
the execution device, and registers on each layer a forward pre-hook that moves the layer there
and a forward hook (``always_call=True``) that moves it back. Because the embeddings, the
rotary embeddings and the inputs are on the device, everything the model computes for its
layers (attention masks, rotary cos/sin, hidden states) is made there too, so a captured
layer's keyword arguments are on the device without being moved. :meth:`LayerOnloader.hold`
keeps one layer on the device across several calls (Wanda runs each layer twice per
calibration batch and then prunes it: one move in and one out instead of two per batch).

On leaving the block every tensor is back on the device it came from (weights pruned while on
the device carry their zeros back), and every hook is removed, in ``finally``. Moves run with
inference mode off, so a model moved inside ``torch.inference_mode()`` keeps ordinary
parameters that autograd can use afterwards.

Limits: a model dispatched by accelerate (``device_map=...``) already moves its own weights
and is refused; load it on the CPU and pass the execution device instead. Tested on CPU
(where "moving" is a no-op, so the tests check the bookkeeping and the results) and, where a
CUDA device exists, with real moves (``tests/test_offload.py``).

Example:
    >>> with onload_layers(model, layout, "cuda") as onloader:
    ...     captured = capture(model, layout, input_ids, attention_mask)  # one layer on the GPU at a time
    >>> onloader.peak_resident
    1
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from cap_lab.modeling.layout import ModelLayout

#: (owning module, "_parameters" or "_buffers", attribute name, device it came from)
_Placement = tuple[nn.Module, str, str, torch.device]
_ACTIVE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@torch.no_grad()
def _place(owners: list[nn.Module], device: torch.device, moved: list[_Placement]) -> None:
    """Move the direct parameters and buffers of ``owners`` to ``device``, appending where each was to ``moved``.

    Each tensor is recorded before it moves, so a move that fails half-way (device out of
    memory) is still undone by :func:`_restore`. A parameter shared by two modules (tied
    embeddings) is one object: it moves once.
    """
    with torch.inference_mode(False):  # new tensors must be ordinary ones, whatever mode the caller is in
        for owner in owners:
            for kind in ("_parameters", "_buffers"):
                tensors = getattr(owner, kind)
                for name, tensor in tensors.items():
                    if tensor is None or tensor.device == device:
                        continue
                    moved.append((owner, kind, name, tensor.device))
                    if kind == "_parameters":
                        tensor.data = tensor.data.to(device)  # the Parameter object (and its users) stays
                    else:
                        tensors[name] = tensor.to(device)


@torch.no_grad()
def _restore(moved: list[_Placement]) -> None:
    """Undo :func:`_place`: every tensor back to the device it came from."""
    with torch.inference_mode(False):
        for owner, kind, name, device in reversed(moved):
            tensors = getattr(owner, kind)
            if kind == "_parameters":
                tensors[name].data = tensors[name].data.to(device)
            else:
                tensors[name] = tensors[name].to(device)


class LayerOnloader:
    """Which decoder layers are on the execution device, inside one :func:`onload_layers` block.

    Attributes:
        device: the execution device.
        peak_resident: the most layers that were on the device at the same time (1 in a correct
            run; the tests check it).
        onloads: how many times a layer was moved to the device.
    """

    def __init__(self, layers: nn.ModuleList, device: torch.device):
        self.device = device
        self.peak_resident = 0
        self.onloads = 0
        self._layers = layers
        self._users: dict[int, int] = {}  # layer index -> open forwards and holds
        self._moved: dict[int, list[_Placement]] = {}

    @property
    def resident(self) -> tuple[int, ...]:
        """Indices of the layers on the execution device now."""
        return tuple(sorted(self._users))

    def enter(self, index: int) -> None:
        """Bring layer ``index`` to the device (if it is not there yet) and count one user."""
        if index not in self._users:
            moved: list[_Placement] = []
            try:
                _place(list(self._layers[index].modules()), self.device, moved)
            except BaseException:  # e.g. out of device memory: leave the layer whole where it was
                _restore(moved)
                raise
            self._users[index], self._moved[index] = 0, moved
            self.onloads += 1
            self.peak_resident = max(self.peak_resident, len(self._users))
        self._users[index] += 1

    def leave(self, index: int) -> None:
        """Drop one user of layer ``index``; the last one sends it back where it came from."""
        if index not in self._users:  # its pre-hook never ran (an earlier hook raised)
            return
        self._users[index] -= 1
        if self._users[index] == 0:
            del self._users[index]
            _restore(self._moved.pop(index))

    @contextmanager
    def hold(self, index: int) -> Iterator[nn.Module]:
        """Keep layer ``index`` on the device for the whole block (its forwards do not move it).

        Yields:
            The layer.
        """
        if not 0 <= index < len(self._layers):
            raise ValueError(f"layer {index} out of range [0, {len(self._layers)})")
        self.enter(index)
        try:
            yield self._layers[index]
        finally:
            self.leave(index)

    def release_all(self) -> None:
        """Send every layer still on the device back (used when the block ends, even on error)."""
        for index in list(self._moved):
            _restore(self._moved.pop(index))
        self._users.clear()


def _check_placeable(model: nn.Module, device: torch.device) -> None:
    if device.type == "meta":
        raise ValueError("execution device 'meta' holds no data; give a real device such as 'cuda' or 'cpu'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"execution device {str(device)!r} asked for, but torch sees no CUDA device")
    if any(hasattr(m, "_hf_hook") for m in model.modules()) or getattr(model, "hf_device_map", None):
        raise ValueError("the model was dispatched by accelerate (device_map=...), which moves its own weights; "
                         "load it on the CPU without device_map and pass the execution device instead")
    on_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if on_meta:
        raise ValueError(f"{len(on_meta)} parameter(s) hold no data (device 'meta', e.g. {on_meta[0]!r}); "
                         "load the model's weights on the CPU first")
    if model in _ACTIVE:
        raise ValueError("onload_layers is already active on this model; nested blocks are not supported")


@contextmanager
def onload_layers(model: nn.Module, layout: ModelLayout, device: str | torch.device) -> Iterator[LayerOnloader]:
    """Run the model with only the decoder layer being called on ``device``, the rest where it is.

    Args:
        model: a supported causal LM, on the CPU (or wherever its layers should stay).
        layout: its layout.
        device: the execution device (``"cuda"``, ``"cuda:1"``; ``"cpu"`` runs the same
            bookkeeping with no moves, which is how the tests check it).

    Yields:
        The :class:`LayerOnloader`, for :meth:`~LayerOnloader.hold` and its counters.

    Raises:
        ValueError: ``device`` is ``meta``, the model was dispatched by accelerate, has weights
            on ``meta``, or is already inside an ``onload_layers`` block.
    """
    device = torch.device(device)
    _check_placeable(model, device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # compares equal to tensor.device
    layers = layout.layers(model)
    onloader = LayerOnloader(layers, device)
    in_layers = {id(m) for m in layers.modules()}
    handles, outside = [], []
    _ACTIVE.add(model)
    try:
        _place([m for m in model.modules() if id(m) not in in_layers], device, outside)
        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(lambda module, args, _i=index: onloader.enter(_i)))
            handles.append(layer.register_forward_hook(lambda module, args, out, _i=index: onloader.leave(_i),
                                                       always_call=True))
        yield onloader
    finally:
        for handle in handles:
            handle.remove()
        onloader.release_all()
        _restore(outside)
        _ACTIVE.discard(model)
