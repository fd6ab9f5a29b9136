"""The work of each head scorer, counted exactly as the code runs it (see :mod:`cap_lab.costmodel`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from cap_lab.costmodel.shapes import CalibrationShape, ModelShape

METHODS = ("reference", "exact", "attribution")


# ------------------------------------------------------------------ counting
@dataclass(frozen=True)
class ScoringCost:
    """The work of one scorer on one calibration set.

    Attributes:
        method: ``reference``, ``exact`` or ``attribution``.
        flops: model FLOPs (linear projections, attention, LM head).
        memory_bytes: bytes read and written by the elementwise passes over logits.
        passes: passes over the calibration set (1 + L*H for reference and exact).
        real_tokens: calibration tokens.
        padded_tokens: tokens of one pass including padding.
        logit_rows: positions whose full-vocabulary logits one scoring run computes.
        grad_flops: the part of ``flops`` run with autograd: a forward that records the graph
            and its backward (attribution).
        lm_head_flops: the part of ``flops`` spent in the LM head without autograd.
    """

    method: str
    flops: int
    memory_bytes: int
    passes: int
    real_tokens: int
    padded_tokens: int
    logit_rows: int
    grad_flops: int = 0
    lm_head_flops: int = 0

    def seconds(self, throughput) -> tuple[float, float]:
        """Predicted ``(compute, memory)`` seconds at a :class:`cap_lab.costmodel.timing.Throughput`."""
        layers = self.flops - self.grad_flops - self.lm_head_flops
        compute = (layers / throughput.flops_per_s + self.lm_head_flops / throughput.lm_head_rate
                   + self.grad_flops / throughput.grad_rate)
        return compute, self.memory_bytes / throughput.bytes_per_s


def logit_bytes(method: str, dtype_bytes: int, softcapping: bool) -> int:
    """Bytes read and written per logit element by a scorer's elementwise passes.

    Soft-capping (divide, tanh, multiply: read and write each), the float32 copy (reference:
    ``logits[:, :-1].float().reshape``; else only from a 16-bit dtype), log-softmax (read and
    write); attribution adds their backward (the log-prob gather's zero-filled gradient,
    log-softmax backward reading gradient and output, the float and soft-capping backward).
    Writing the LM head's output is part of the LM head's time (:attr:`Throughput.lm_head_flops_per_s`).
    """
    e = dtype_bytes
    cap = 3 * 2 * e if softcapping else 0
    upcast = e + 4 if e != 4 else 0
    forward = cap + upcast + 8
    if method == "reference":
        return forward + (8 if e == 4 else 0)  # the shifted view is copied to reshape it
    if method == "exact":
        return forward
    if method == "attribution":
        return forward + 4 + 12 + upcast + (3 * 3 * e if softcapping else 0)
    raise ValueError(f"method={method!r}; allowed: {', '.join(METHODS)}")


def reference_cost(shape: ModelShape, calib: CalibrationShape, dtype_bytes: int = 4) -> ScoringCost:
    """The reference scorer: 1 + L*H full forwards, LM head and cross-entropy at every position."""
    flops = logits = padded = 0
    for batch in calib.batches():
        rows, width = len(batch), max(calib.lengths[i] for i in batch)
        flops += rows * (shape.layers_flops(width) + width * shape.lm_head_flops)
        logits += rows * width
        padded += rows * width
    passes = 1 + shape.num_layers * shape.num_heads
    per_element = logit_bytes("reference", dtype_bytes, shape.logit_softcapping)
    return ScoringCost("reference", passes * flops, passes * logits * shape.vocab_size * per_element, passes,
                       calib.n_tokens, padded, passes * logits, lm_head_flops=passes * logits * shape.lm_head_flops)


def exact_cost(shape: ModelShape, calib: CalibrationShape, dtype_bytes: int = 4, verify_replay: bool = True,
               layers: Sequence[int] | None = None) -> ScoringCost:
    """The fast exact scorer: prefix reuse, head batching, LM head at target positions only.

    Args:
        shape: the model.
        calib: the calibration set's token counts.
        dtype_bytes: bytes per logit element as the LM head writes it.
        verify_replay: count the replay check of the model's first capture (a fresh process).
        layers: the layers whose heads this process masks (one rank's share under torchrun,
            :func:`cap_lab.distributed.my_share`); default all of them, one process.
    """
    L, H = shape.num_layers, shape.num_heads
    mine = sorted(range(L) if layers is None else set(layers))
    flops = logits = padded = 0
    for k, chunk in enumerate(calib.chunks()):
        rows, width = len(chunk), max(calib.lengths[i] for i in chunk)
        targets = sum(calib.targets[i] for i in chunk)
        padded += rows * width
        per_layer = [shape.layer_flops(layer, width) for layer in range(L)]
        suffix = [sum(per_layer[first:]) for first in range(L)]  # layers l..L-1, one row
        flops += rows * suffix[0] + targets * shape.lm_head_flops  # the intact capture pass and its loss
        logits += targets
        if k == 0 and verify_replay:
            flops += 2 * rows * suffix[0]
        for layer in range(mine[0], mine[-1] + 1) if mine else ():
            if layer in mine:
                flops += H * (rows * suffix[layer] + targets * shape.lm_head_flops)
                logits += H * targets
            if layer < mine[-1]:  # advance the kept hidden states by one intact layer
                flops += rows * per_layer[layer]
    per_element = logit_bytes("exact", dtype_bytes, shape.logit_softcapping)
    return ScoringCost("exact", flops, logits * shape.vocab_size * per_element, 1 + len(mine) * H, calib.n_tokens,
                       padded, logits, lm_head_flops=logits * shape.lm_head_flops)


def exact_rank_costs(shape: ModelShape, calib: CalibrationShape, ranks: int, dtype_bytes: int = 4,
                     verify_replay: bool = True) -> list[ScoringCost]:
    """Each rank's work when ``ranks`` processes share the exact scorer's layers (torchrun).

    Every rank captures every chunk; rank r masks the heads of its snake-order share of the
    layers (:func:`cap_lab.distributed.my_share`). The slowest rank sets the wall time.
    """
    from cap_lab.distributed import my_share

    if ranks < 1:
        raise ValueError(f"ranks={ranks}; must be >= 1")
    return [exact_cost(shape, calib, dtype_bytes, verify_replay, my_share(range(shape.num_layers), r, ranks))
            for r in range(ranks)]


def attribution_cost(shape: ModelShape, calib: CalibrationShape, dtype_bytes: int = 4,
                     verify_replay: bool = True) -> ScoringCost:
    """Attribution patching: one forward, then input gradients back to every layer's ``o_proj`` input.

    Args:
        verify_replay: count the replay check of the model's first capture (a fresh process).
    """
    grad = replay = logits = padded = 0
    for k, batch in enumerate(calib.batches()):
        rows, width = len(batch), max(calib.lengths[i] for i in batch)
        targets = sum(calib.targets[i] for i in batch)
        grad += rows * (shape.layers_flops(width) + shape.input_grad_flops(width)) + 2 * targets * shape.lm_head_flops
        if k == 0 and verify_replay:
            replay += 2 * rows * shape.layers_flops(width)  # without autograd
        logits += targets
        padded += rows * width
    per_element = logit_bytes("attribution", dtype_bytes, shape.logit_softcapping)
    return ScoringCost("attribution", grad + replay, logits * shape.vocab_size * per_element, 1, calib.n_tokens,
                       padded, logits, grad_flops=grad)


def scoring_costs(shape: ModelShape, calib: CalibrationShape, dtype_bytes: int = 4,
                  verify_replay: bool = True) -> dict[str, ScoringCost]:
    """``{method: ScoringCost}`` of the three scorers."""
    return {"reference": reference_cost(shape, calib, dtype_bytes),
            "exact": exact_cost(shape, calib, dtype_bytes, verify_replay),
            "attribution": attribution_cost(shape, calib, dtype_bytes, verify_replay)}
