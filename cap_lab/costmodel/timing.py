"""Throughput of a machine, measured or assumed, and the wall time it predicts for each scorer."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cap_lab.costmodel.counting import ScoringCost, scoring_costs
from cap_lab.costmodel.shapes import CalibrationShape, ModelShape


# ------------------------------------------------------------------ throughput
@dataclass(frozen=True)
class Throughput:
    """How fast a machine does the two kinds of work.

    Attributes:
        flops_per_s: effective FLOP/s of model FLOPs in a forward (matmuls, with the norms,
            activations and rotary embeddings that go with them in a decoder layer).
        bytes_per_s: effective bandwidth of elementwise passes over logits (bytes read + written).
        source: where the numbers come from (measured when, on what; or an assumed profile).
        grad_flops_per_s: the same for a forward that records the graph plus its input-gradient
            backward; ``None``: ``flops_per_s``.
        lm_head_flops_per_s: FLOP/s of the LM head, writing its (rows, vocab) output; ``None``:
            ``flops_per_s``.
    """

    flops_per_s: float
    bytes_per_s: float
    source: str = "given"
    grad_flops_per_s: float | None = None
    lm_head_flops_per_s: float | None = None

    def __post_init__(self) -> None:
        if not (self.flops_per_s > 0 and self.bytes_per_s > 0 and self.grad_rate > 0 and self.lm_head_rate > 0):
            raise ValueError(f"flops_per_s={self.flops_per_s}, bytes_per_s={self.bytes_per_s}, grad_flops_per_s="
                             f"{self.grad_flops_per_s}, lm_head_flops_per_s={self.lm_head_flops_per_s}; all must be > 0")

    @property
    def grad_rate(self) -> float:
        return self.grad_flops_per_s if self.grad_flops_per_s is not None else self.flops_per_s

    @property
    def lm_head_rate(self) -> float:
        return self.lm_head_flops_per_s if self.lm_head_flops_per_s is not None else self.flops_per_s


#: an assumed H100/H200-class accelerator in bfloat16: 400 TFLOP/s effective (about 40% of the
#: dense bf16 peak), 3 TB/s for elementwise passes
H100_CLASS = Throughput(400e12, 3e12, "assumed H100/H200-class bf16: 400 TFLOP/s effective, 3 TB/s")


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
LM_HEAD_COLUMNS = 65536  # vocabulary columns of the timed LM head: its output still leaves the caches


def _median_time(fn, repeats: int, clock) -> float:
    fn()  # first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return sorted(times)[len(times) // 2]


def one_layer_config(shape: ModelShape, vocab_size: int = 256):
    """A transformers config of ``shape``'s architecture with one decoder layer and a small vocabulary.

    From ``shape.config`` when it has one (so the layer has the model's own norms, activation
    and rotary embeddings), else a Llama config of the shape's sizes. The layer is of the
    model's most common attention type (Gemma-3: sliding window).
    """
    from transformers import AutoConfig

    if shape.config is not None:
        fields = shape.config.to_dict()
    else:
        fields = dict(model_type="llama", hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                      num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
                      head_dim=shape.head_dim, rope_theta=500000.0, max_position_embeddings=8192)
    types = fields.get("layer_types")
    if types:
        fields["layer_types"] = [max(set(types), key=list(types).count)]
    fields.update(num_hidden_layers=1, vocab_size=vocab_size, tie_word_embeddings=False, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def calibrate(shape: ModelShape, rows: int = 512, width: int = 128, logit_rows: int | None = None, repeats: int = 3,
              dtype: torch.dtype = torch.float32, device: str = "cpu", clock: str = "wall") -> Throughput:
    """Measure this machine's FLOP/s and logit-pass bandwidth at ``shape``'s sizes.

    Times (the median of ``repeats``, after one untimed call):

    * one real decoder layer of the model's architecture (random weights, :func:`one_layer_config`)
      on ``rows`` tokens in rows of ``width``, called with the arguments the model's own forward
      gives it (:func:`cap_lab.modeling.capture`): its matmuls with the norms, activation, rotary
      embeddings and attention around them, as the scorers run them;
    * the same layer's forward with autograd and its input-gradient backward (attribution);
    * the LM head on the same tokens (at most :data:`LM_HEAD_COLUMNS` vocabulary columns),
      writing a fresh output as the scorers do;
    * a log-softmax over a freshly written (logit_rows, vocab) float32 tensor, counted as 8 bytes
      per element (read and write). ``logit_rows`` defaults to a 64 MiB tensor, large enough to
      leave the caches and, on CPU, to be a fresh allocation like the scorers' logits.

    Args:
        shape: whose architecture and sizes to time.
        rows: tokens per layer call (rounded down to whole rows of ``width``, at least one row).
        width: tokens per row.
        logit_rows: rows of the log-softmax input.
        repeats: timed repetitions (the median counts: the rate a long run sustains on a busy machine).
        dtype: weights and activations dtype.
        device: where to time.
        clock: ``wall`` (predictions are wall seconds on a machine this busy) or ``process``
            (CPU seconds of this process: on a CPU shared with other work and one torch thread,
            the time the work needs when it has a core, which predictions are then compared with).

    Returns:
        A :class:`Throughput` whose ``source`` records the date, device, threads, clock and sizes.
    """
    from transformers import AutoModelForCausalLM

    from cap_lab.modeling import call_layer, capture, get_layout

    if rows < 1 or width < 1 or repeats < 1:
        raise ValueError(f"rows={rows}, width={width}, repeats={repeats}; all must be >= 1")
    if clock not in CLOCKS:
        raise ValueError(f"clock={clock!r}; allowed: {', '.join(CLOCKS)}")
    config = one_layer_config(shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    layout, one = get_layout(model), ModelShape.from_config(config)
    batch = max(1, rows // width)
    ids = torch.randint(3, config.vocab_size, (batch, width), device=device)
    with torch.no_grad():  # plain tensors, so the backward below may save them
        captured = capture(model, layout, ids, None)
    layer, kwargs, hidden = layout.layers(model)[0], captured.layer_kwargs[0], captured.hidden
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)

    def forward():
        with torch.inference_mode():
            call_layer(layer, hidden, kwargs)
        sync()

    def forward_backward():
        x = hidden.detach().requires_grad_(True)
        out = call_layer(layer, x, kwargs)
        torch.autograd.grad(out, x, grad_outputs=torch.ones_like(out))
        sync()

    forward_s = _median_time(forward, repeats, CLOCKS[clock])
    grad_s = _median_time(forward_backward, repeats, CLOCKS[clock])
    layer_flops = batch * one.layer_flops(0, width)
    backward_flops = batch * (one.linear_flops * width + 2 * one.attention_flops * one.attention_pairs(0, width))
    del model, captured, layer, kwargs, hidden

    columns = min(shape.vocab_size, LM_HEAD_COLUMNS)
    normed = torch.randn(batch * width, shape.hidden_size, device=device, dtype=dtype)
    head = torch.randn(columns, shape.hidden_size, device=device, dtype=dtype) / shape.hidden_size ** 0.5

    def lm_head():
        torch.nn.functional.linear(normed, head)
        sync()

    lm_head_s = _median_time(lm_head, repeats, CLOCKS[clock])
    del normed, head
    logit_rows = logit_rows or max(16, (64 << 20) // (4 * shape.vocab_size))
    logits = torch.randn(logit_rows, shape.vocab_size, device=device)

    def log_softmax():
        torch.log_softmax(logits, dim=-1)
        sync()

    softmax_s = _median_time(log_softmax, repeats, CLOCKS[clock])
    threads = f", {torch.get_num_threads()} threads" if device == "cpu" else ""
    source = (f"measured {time.strftime('%Y-%m-%d %H:%M')} on {device}{threads}, {clock} clock: one {shape.name} "
              f"decoder layer on {batch}x{width} tokens, log_softmax over ({logit_rows}, {shape.vocab_size})")
    return Throughput(layer_flops / forward_s, 8 * logit_rows * shape.vocab_size / softmax_s, source,
                      (layer_flops + backward_flops) / grad_s, 2 * batch * width * shape.hidden_size * columns / lm_head_s)


# ------------------------------------------------------------------ prediction
@dataclass(frozen=True)
class Prediction:
    """A scorer's predicted wall time.

    Attributes:
        cost: the counted work.
        compute_s: FLOPs / throughput.
        memory_s: logit-pass bytes / bandwidth.
    """

    cost: ScoringCost
    compute_s: float
    memory_s: float

    @property
    def seconds(self) -> float:
        return self.compute_s + self.memory_s


def predict(shape: ModelShape, calib: CalibrationShape, throughput: Throughput, dtype_bytes: int = 4,
            verify_replay: bool = True) -> dict[str, Prediction]:
    """``{method: Prediction}`` for the three scorers on ``calib`` at ``throughput``.

    Example:
        >>> shape = BUILTIN_SHAPES["llama-3-8b"]
        >>> p = predict(shape, CalibrationShape.uniform(384, 512), H100_CLASS, dtype_bytes=2)
        >>> p["exact"].seconds < p["reference"].seconds
        True
    """
    return {m: Prediction(c, *c.seconds(throughput))
            for m, c in scoring_costs(shape, calib, dtype_bytes, verify_replay).items()}


def format_table(predictions: dict[str, Prediction]) -> str:
    """A text table: method, passes, GFLOP, GB of logit traffic, compute, memory and total seconds."""
    lines = [f"{'method':<12} {'passes':>6} {'GFLOP':>14} {'logit GB':>10} {'compute s':>11} {'memory s':>10} "
             f"{'total s':>11} {'hours':>8}"]
    for method, p in predictions.items():
        c = p.cost
        lines.append(f"{method:<12} {c.passes:>6} {c.flops / 1e9:14.1f} {c.memory_bytes / 1e9:10.2f} "
                     f"{p.compute_s:11.2f} {p.memory_s:10.2f} {p.seconds:11.2f} {p.seconds / 3600:8.3f}")
    return "\n".join(lines)
