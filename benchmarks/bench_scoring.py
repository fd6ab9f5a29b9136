"""Benchmark of the head scorers: reference vs fast exact vs attribution patching (issues 5, 14).

Runs, in one process on one model and one fixed calibration set, the three scorers of
:mod:`cap_lab.scoring` and prints for each: wall time, ratio to the reference, the largest
absolute score difference to the reference, the tokens each forward touches (real and padded),
the model FLOPs each path performs, and the wall time :mod:`cap_lab.costmodel` predicts for it
(compute + logit memory traffic) with its error. The machine's throughput is measured
(:func:`cap_lab.costmodel.calibrate`, about a second) before and after every scorer, and each
scorer is predicted with the mean of the two. On a CPU shared with other work, ``--threads 1
--clock cpu`` times the calibration in process CPU seconds and reads each prediction against the
scorer's CPU seconds: the time the work took while it had a core, which does not depend on how
busy the machine was. The last line is machine-readable::

    fast_ratio=<x> max_abs_diff=<y> attribution_ratio=<z> spearman=<r>

Usage::

    python benchmarks/bench_scoring.py                      # default model
    python benchmarks/bench_scoring.py --model gemma3-270m --threads 1 --clock cpu --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch

from cap_lab.calibration import CalibrationConfig, build_calibration_set
from cap_lab.costmodel import (
    CalibrationShape, ModelShape, Prediction, Throughput, attribution_cost, calibrate, exact_cost, reference_cost,
)
from cap_lab.modeling import get_layout
from cap_lab.models import DEFAULT_MODEL, load_model
from cap_lab.scoring import compare_scores, score_heads_reference
from cap_lab.scoring.attribution import score_heads_attribution
from cap_lab.scoring.exact import score_heads_exact


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


def mean_throughput(before: Throughput, after: Throughput) -> Throughput:
    """The mean of the machine's throughput measured before and after a scorer ran."""
    return Throughput((before.flops_per_s + after.flops_per_s) / 2, (before.bytes_per_s + after.bytes_per_s) / 2,
                      f"mean of before and after; {before.source}", (before.grad_rate + after.grad_rate) / 2,
                      (before.lm_head_rate + after.lm_head_rate) / 2)


def describe(t: Throughput) -> str:
    return (f"{t.flops_per_s / 1e9:.1f} GFLOP/s decoder layer forward, {t.grad_rate / 1e9:.1f} with backward, "
            f"{t.lm_head_rate / 1e9:.1f} LM head, {t.bytes_per_s / 1e9:.2f} GB/s logit passes")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model alias or folder (default {DEFAULT_MODEL})")
    p.add_argument("--per-task", type=int, default=1, help="calibration examples per task")
    p.add_argument("--subsets", type=int, default=1, help="K subsets")
    p.add_argument("--max-length", type=int, default=128, help="token cap per example")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--data-dir", default=None, help="data folder (default $CAP_LAB_DATA)")
    p.add_argument("--json", default=None, help="also write the measured and predicted figures to this JSON file")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="what the throughput calibration times and predictions are read against: wall seconds, or "
                        "this process's CPU seconds (with --threads 1 on a shared machine: the time it had a core)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model(args.model, device="cpu", dtype="float32")
    model = lm.model
    layout = get_layout(model)
    config = CalibrationConfig(n_per_task=args.per_task, n_subsets=args.subsets, max_length=args.max_length)
    calib = build_calibration_set(lm.tokenizer, config, args.data_dir)
    shape = ModelShape.from_config(model.config, args.model)
    profile = CalibrationShape.of(calib, args.batch_size)
    # exact and attribution each get a model whose replay is not yet verified, as in a fresh `cap-lab score`
    counts = {"reference": reference_cost(shape, profile), "exact": exact_cost(shape, profile, verify_replay=True),
              "attribution": attribution_cost(shape, profile, verify_replay=True)}
    calibration_rows = max(len(b) * max(profile.lengths[i] for i in b) for b in profile.batches())
    clock = "process" if args.clock == "cpu" else "wall"
    measure = lambda: calibrate(shape, rows=max(64, calibration_rows), width=max(profile.lengths),  # noqa: E731
                                repeats=5, clock=clock)
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
    throughputs = [measure()]

    def run(name, fn):
        out = timed(name, fn)
        throughputs.append(measure())
        print(f"  throughput after {name}: {describe(throughputs[-1])}", flush=True)
        return out

    print(f"  throughput before: {describe(throughputs[0])} ({throughputs[0].source})", flush=True)
    ref, t_ref = run("reference", lambda: score_heads_reference(model, calib, batch_size=args.batch_size,
                                                                progress=False))
    fast, t_fast = run("exact", lambda: score_heads_exact(model, calib, batch_size=args.batch_size, progress=False))
    fresh = load_model(args.model, device="cpu", dtype="float32").model  # same weights, replay not yet verified
    with torch.inference_mode():  # its warm-up (the replay check stays for the scorer's first capture)
        fresh(input_ids=torch.tensor([calib.items[0].input_ids]))
    attr, t_attr = run("attribution", lambda: score_heads_attribution(fresh, calib, batch_size=args.batch_size,
                                                                      progress=False))
    del fresh
    assert fast.settings["padded_tokens"] == counts["exact"].padded_tokens, (fast.settings, counts["exact"])

    rows = [("reference", ref, t_ref), ("exact", fast, t_fast), ("attribution", attr, t_attr)]
    predictions = {name: Prediction(counts[name], *counts[name].seconds(mean_throughput(throughputs[k],
                                                                                        throughputs[k + 1])))
                   for k, (name, _, _) in enumerate(rows)}
    print(f"{'method':<12} {'wall_s':>8} {'ratio':>7} {'cpu_s':>8} {'cpu ratio':>9} {'max|diff|':>10} "
          f"{'tokens real/padded':>19} {'model GFLOP':>12} {'FLOP ratio':>10} {'GFLOP/s':>8} "
          f"{'pred_s':>8} {'(compute+memory)':>17} {'vs wall':>8} {'vs cpu':>7}")
    for name, result, t in rows:
        c, pred = counts[name], predictions[name]
        diff = float((result.scores - ref.scores).abs().max())
        print(f"{name:<12} {t.wall:8.1f} {t.wall / t_ref.wall:7.4f} {t.cpu:8.1f} {t.cpu / t_ref.cpu:9.4f} {diff:10.2e} "
              f"{c.real_tokens:>9}/{c.padded_tokens:<9} {c.flops / 1e9:12.1f} "
              f"{c.flops / counts['reference'].flops:10.4f} {c.flops / 1e9 / t.wall:8.1f} "
              f"{pred.seconds:8.1f} {f'({pred.compute_s:.1f}+{pred.memory_s:.1f})':>17} "
              f"{(pred.seconds - t.wall) / t.wall:+8.1%} {(pred.seconds - t.cpu) / t.cpu:+7.1%}")
    print("tokens per pass; reference and exact make 1 + L*H passes (exact: layers l..L-1 only for heads of layer l, "
          "lm_head at target positions only), attribution one forward + backward; GFLOP/s per wall second; "
          f"pred_s: cap_lab.costmodel at the mean throughput measured ({clock} clock, median of 5) before and after "
          "each scorer, and its error against wall and against process CPU seconds (with --threads 1 on a shared "
          "machine the CPU seconds are the time the scorer had a core; wall = CPU / its share of a core)")
    agreement = compare_scores(fast, attr, model)
    print(f"attribution vs exact: spearman {agreement.spearman:.4f}, kendall {agreement.kendall:.4f}, "
          f"top-10% overlap {agreement.top_overlap:.2f} ({agreement.top_k} heads), "
          f"weights pruned differently at 20% sparsity {agreement.pruned_differently:.4f}")
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    max_diff = float((fast.scores - ref.scores).abs().max())
    if args.json:
        record = {"model": args.model, "date": time.strftime("%Y-%m-%d %H:%M"), "threads": torch.get_num_threads(),
                  "load_before": load, "load_after": load_after, "calibration": vars(args),
                  "lengths": profile.lengths, "targets": profile.targets,
                  "throughputs": [asdict(t) for t in throughputs],
                  "methods": {name: {"wall_s": t.wall, "cpu_s": t.cpu, "predicted_s": predictions[name].seconds,
                                     "compute_s": predictions[name].compute_s, "memory_s": predictions[name].memory_s,
                                     **asdict(counts[name])} for name, _, t in rows}}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
    print(f"fast_ratio={t_fast.wall / t_ref.wall:.4f} max_abs_diff={max_diff:.3e} "
          f"attribution_ratio={t_attr.wall / t_ref.wall:.4f} spearman={agreement.spearman:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
