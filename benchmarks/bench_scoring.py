"""Benchmark of the head scorers: reference vs fast exact vs attribution patching (issue 5).

Runs, in one process on one model and one fixed calibration set, the three scorers of
:mod:`cap_lab.scoring` and prints for each: wall time, ratio to the reference, the largest
absolute score difference to the reference, the tokens each forward touches (real and padded)
and the model FLOPs each path performs (counted from the layer shapes, see :func:`flop_counts`),
so each time can be read against its own arithmetic bound. The last line is machine-readable::

    fast_ratio=<x> max_abs_diff=<y> attribution_ratio=<z> spearman=<r>

Usage::

    python benchmarks/bench_scoring.py                      # default model
    python benchmarks/bench_scoring.py --model gemma3-270m
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass

import torch
from torch import nn

from cap_lab.modeling import ModelLayout, get_layout
from cap_lab.scoring.attribution import score_heads_attribution
from cap_lab.calibration import CalibrationConfig, CalibrationSet, build_calibration_set
from cap_lab.scoring.exact import plan_chunks, score_heads_exact
from cap_lab.models import DEFAULT_MODEL, load_model
from cap_lab.scoring import compare_scores, score_heads_reference


# ------------------------------------------------------------------ model FLOPs
@dataclass(frozen=True)
class FlopModel:
    """Per-token FLOPs of a model's parts (2 per multiply-add).

    Attributes:
        linear: (L,) FLOPs of each decoder layer's linear projections per token.
        attention: (L,) FLOPs per query token per key (QK^T and AV: 4 * H * D).
        window: (L,) keys a query sees at most (sliding-window layers), else None.
        lm_head: FLOPs of ``lm_head`` per token.
    """

    linear: list[int]
    attention: list[int]
    window: list[int | None]
    lm_head: int

    @classmethod
    def of(cls, model: nn.Module, layout: ModelLayout) -> "FlopModel":
        types = getattr(model.config, "layer_types", None) or ["full_attention"] * layout.num_layers
        linear = [sum(2 * m.in_features * m.out_features for m in layer.modules() if isinstance(m, nn.Linear))
                  for layer in layout.layers(model)]
        window = [model.config.sliding_window if t == "sliding_attention" else None for t in types]
        head = layout.lm_head(model)
        return cls(linear, [4 * layout.num_heads * layout.head_dim] * layout.num_layers, window,
                   2 * head.in_features * head.out_features)

    def layers(self, width: int, first: int = 0) -> int:
        """FLOPs of layers ``first..L-1`` for one row of ``width`` tokens (causal attention)."""
        total = 0
        for i in range(first, len(self.linear)):
            keys = sum(min(t + 1, self.window[i] or width) for t in range(width))
            total += self.linear[i] * width + self.attention[i] * keys
        return total


def flop_counts(model: nn.Module, calib: CalibrationSet, batch_size: int, fast_chunks: list[list[int]]) -> dict:
    """Model FLOPs and tokens of each scorer on ``calib`` (see the module docstring)."""
    layout = get_layout(model)
    fm = FlopModel.of(model, layout)
    n_heads, n_layers = layout.num_heads, layout.num_layers
    lengths = [len(it.input_ids) for it in calib.items]
    targets = [len(it.input_ids) - max(it.target_start, 1) for it in calib.items]

    ref_batches = [[i for i in b.items] for b in calib.batches(list(range(len(lengths))), batch_size)]
    ref_pass = sum(len(b) * (fm.layers(max(lengths[i] for i in b)) + max(lengths[i] for i in b) * fm.lm_head)
                   for b in ref_batches)
    ref_padded = sum(len(b) * max(lengths[i] for i in b) for b in ref_batches)

    fast, fast_padded = 0, 0
    for chunk in fast_chunks:
        rows, width, tgt = len(chunk), max(lengths[i] for i in chunk), sum(targets[i] for i in chunk)
        fast_padded += rows * width
        fast += rows * fm.layers(width) + tgt * fm.lm_head  # the intact capture pass
        for layer in range(n_layers):
            fast += n_heads * (rows * fm.layers(width, layer) + tgt * fm.lm_head)
            if layer + 1 < n_layers:  # advancing the kept hidden states by one intact layer
                fast += rows * (fm.layers(width, layer) - fm.layers(width, layer + 1))
    attr_forward = sum(len(b) * fm.layers(max(lengths[i] for i in b)) + sum(targets[i] for i in b) * fm.lm_head
                       for b in ref_batches)
    return {
        "reference": {"flops": (1 + n_layers * n_heads) * ref_pass, "passes": 1 + n_layers * n_heads,
                      "real": sum(lengths), "padded": ref_padded},
        "exact": {"flops": fast, "passes": 1 + n_layers * n_heads, "real": sum(lengths), "padded": fast_padded},
        # backward without weight gradients costs about one more forward
        "attribution": {"flops": 2 * attr_forward, "passes": 1, "real": sum(lengths), "padded": ref_padded},
    }


# ------------------------------------------------------------------ run
@dataclass
class Timing:
    """Wall and process CPU seconds of one phase (CPU / wall shows how much of the machine it got)."""

    wall: float
    cpu: float


def timed(name: str, fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    t = Timing(time.perf_counter() - wall, time.process_time() - cpu)
    print(f"  {name} done: {t.wall:.1f} s wall, {t.cpu:.1f} s CPU, load average {os.getloadavg()[0]:.2f}", flush=True)
    return out, t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model alias or folder (default {DEFAULT_MODEL})")
    p.add_argument("--per-task", type=int, default=1, help="calibration examples per task")
    p.add_argument("--subsets", type=int, default=1, help="K subsets")
    p.add_argument("--max-length", type=int, default=128, help="token cap per example")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--data-dir", default=None, help="data folder (default $CAP_LAB_DATA)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model(args.model, device="cpu", dtype="float32")
    model = lm.model
    layout = get_layout(model)
    config = CalibrationConfig(n_per_task=args.per_task, n_subsets=args.subsets, max_length=args.max_length)
    calib = build_calibration_set(lm.tokenizer, config, args.data_dir)
    chunks = plan_chunks([len(it.input_ids) for it in calib.items], args.batch_size)
    counts = flop_counts(model, calib, args.batch_size, chunks)
    load = os.getloadavg()
    print(f"model {args.model}: {layout.num_layers} layers x {layout.num_heads} heads "
          f"({layout.num_kv_heads} KV, head_dim {layout.head_dim}), float32 on CPU, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
    print(f"calibration: {len(calib.items)} examples ({args.per_task} per task, K={args.subsets}, "
          f"max_length {args.max_length}, batch_size {args.batch_size}): {calib.n_tokens} tokens, "
          f"{calib.n_target_tokens} target tokens; load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
          flush=True)

    with torch.inference_mode():  # warm-up: first-call allocations and kernel selection
        model(input_ids=torch.tensor([calib.items[0].input_ids]))
    ref, t_ref = timed("reference", lambda: score_heads_reference(model, calib, batch_size=args.batch_size, progress=False))
    fast, t_fast = timed("exact", lambda: score_heads_exact(model, calib, batch_size=args.batch_size, progress=False))
    attr, t_attr = timed("attribution", lambda: score_heads_attribution(model, calib, batch_size=args.batch_size,
                                                                        progress=False))
    assert fast.settings["padded_tokens"] == counts["exact"]["padded"], (fast.settings, counts["exact"])

    rows = [("reference", ref, t_ref), ("exact", fast, t_fast), ("attribution", attr, t_attr)]
    print(f"{'method':<12} {'wall_s':>8} {'ratio':>7} {'cpu_s':>8} {'cpu ratio':>9} {'max|diff|':>10} "
          f"{'tokens real/padded':>19} {'model GFLOP':>12} {'FLOP ratio':>10} {'GFLOP/s':>8}")
    for name, result, t in rows:
        c = counts[name]
        diff = float((result.scores - ref.scores).abs().max())
        print(f"{name:<12} {t.wall:8.1f} {t.wall / t_ref.wall:7.4f} {t.cpu:8.1f} {t.cpu / t_ref.cpu:9.4f} {diff:10.2e} "
              f"{c['real']:>9}/{c['padded']:<9} {c['flops'] / 1e9:12.1f} "
              f"{c['flops'] / counts['reference']['flops']:10.4f} {c['flops'] / 1e9 / t.wall:8.1f}")
    print("tokens per pass; reference and exact make 1 + L*H passes (exact: layers l..L-1 only for heads of layer l, "
          "lm_head at target positions only), attribution one forward + backward; GFLOP/s per wall second")
    agreement = compare_scores(fast, attr, model)
    print(f"attribution vs exact: spearman {agreement.spearman:.4f}, kendall {agreement.kendall:.4f}, "
          f"top-10% overlap {agreement.top_overlap:.2f} ({agreement.top_k} heads), "
          f"weights pruned differently at 20% sparsity {agreement.pruned_differently:.4f}")
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    max_diff = float((fast.scores - ref.scores).abs().max())
    print(f"fast_ratio={t_fast.wall / t_ref.wall:.4f} max_abs_diff={max_diff:.3e} "
          f"attribution_ratio={t_attr.wall / t_ref.wall:.4f} spearman={agreement.spearman:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
