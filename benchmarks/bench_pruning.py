"""Benchmark of the pruning methods: SparseGPT, Wanda and CAP side by side (issue 13).

On one model and one fixed calibration set, at one sparsity (default 50%), times each method's
pruning and prints its wall and CPU seconds and the achieved sparsity, restoring the dense
weights between methods (:class:`cap_lab.sweep.DenseWeights`) so each starts from the same model.

What is timed, per method:

* ``wanda``, ``sparsegpt``: :func:`cap_lab.pruning.prune_model`, i.e. the intact capture pass,
  then per layer the statistics pass, the pruning (SparseGPT: Hessian, Cholesky, blocked OBS
  updates) and the replay that feeds the next layer;
* ``cap``: :func:`cap_lab.pruning.prune_model` from head scores already computed (importance
  factors, global threshold, masks). Scoring is timed separately and printed on its own line:
  by default ``attribution`` scoring, recomputed (cache off); ``--cap-scores exact`` takes the
  exact scores from the score cache when they are there (computing and caching them otherwise).

Not timed: loading the model, building the calibration set, restoring the dense weights.
The CPU may be shared: the load average is printed before and after each method. On a busy
2-core machine ``--threads 1`` is the stable setting: with 2 torch threads competing with other
processes every method ran 2-20x slower and erratically (SparseGPT's column loop is many small
operations, CAP's threshold search many small passes).

Usage::

    CAP_LAB_DATA=/work/shared/data python benchmarks/bench_pruning.py --threads 1   # default model
    python benchmarks/bench_pruning.py --per-task 3 --subsets 3 --max-length 64 --sparsity 0.5
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from cap_lab.calibration import CalibrationConfig, build_calibration_set
from cap_lab.modeling import get_layout
from cap_lab.models import DEFAULT_MODEL, load_model
from cap_lab.pruning import PruneConfig, prune_model
from cap_lab.scoring import head_scores
from cap_lab.sweep import DenseWeights


def timed(name: str, fn):
    """Run ``fn``; returns its result, wall seconds and process CPU seconds, and prints them with the load."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"  {name} done: {wall:.1f} s wall, {cpu:.1f} s CPU, load average {os.getloadavg()[0]:.2f}", flush=True)
    return out, wall, cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model alias or folder (default {DEFAULT_MODEL})")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--per-task", type=int, default=3, help="calibration examples per task (profile-like: 3)")
    p.add_argument("--subsets", type=int, default=3, help="K subsets (profile-like: 3)")
    p.add_argument("--max-length", type=int, default=64, help="token cap per example (profile-like: 64)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cap-scores", choices=("attribution", "exact"), default="attribution",
                   help="scores CAP prunes from: attribution recomputed (timed), or exact from the cache")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--data-dir", default=None, help="data folder (default $CAP_LAB_DATA)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model(args.model, device="cpu", dtype="float32")
    layout = get_layout(lm.model)
    config = CalibrationConfig(n_per_task=args.per_task, n_subsets=args.subsets, max_length=args.max_length)
    calib = build_calibration_set(lm.tokenizer, config, args.data_dir)
    load = os.getloadavg()
    print(f"model {args.model}: {layout.num_layers} layers x {layout.num_heads} heads, float32 on CPU, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
    print(f"calibration: {len(calib.items)} examples ({args.per_task} per task, K={args.subsets}, max_length "
          f"{args.max_length}, batch_size {args.batch_size}): {calib.n_tokens} tokens; sparsity {args.sparsity}; "
          f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    with torch.inference_mode():  # warm-up: first-call allocations and kernel selection
        lm.model(input_ids=torch.tensor([calib.items[0].input_ids]))
    dense = DenseWeights(lm.model)

    scoring, t_score, c_score = timed(f"{args.cap_scores} scoring", lambda: head_scores(
        lm, calib, method=args.cap_scores, batch_size=args.batch_size, use_cache=args.cap_scores == "exact",
        progress=False))
    rows = []
    for method in ("sparsegpt", "wanda", "cap"):
        prune = PruneConfig(method, args.sparsity)
        result, wall, cpu = timed(method, lambda: prune_model(lm.model, prune, head_scores=scoring.scores, calib=calib,
                                                               batch_size=args.batch_size, progress=False))
        rows.append((method, wall, cpu, result.achieved_sparsity, result.selected, result.total))
        dense.restore(lm.model)

    print(f"{'method':<10} {'prune wall_s':>12} {'cpu_s':>8} {'achieved sparsity':>18} {'selected':>10} {'of':>10}  timed")
    what = {"sparsegpt": "capture + per layer: Hessians, Cholesky, blocked OBS update, replay",
            "wanda": "capture + per layer: input norms, per-row masks, replay",
            "cap": f"factors + global threshold + masks from {args.cap_scores} scores (scoring below)"}
    for method, wall, cpu, achieved, selected, total in rows:
        print(f"{method:<10} {wall:12.2f} {cpu:8.1f} {achieved:18.6f} {selected:>10} {total:>10}  {what[method]}")
    cap_wall = next(r[1] for r in rows if r[0] == "cap")
    print(f"{'cap total':<10} {t_score + cap_wall:12.2f} {c_score + next(r[2] for r in rows if r[0] == 'cap'):8.1f}"
          f"{'':>18} {'':>10} {'':>10}  {args.cap_scores} scoring {t_score:.2f} s "
          f"({'cache on: served from the cache if it was there' if args.cap_scores == 'exact' else 'recomputed, cache off'})"
          f" + pruning {cap_wall:.2f} s")
    print("not timed: model load, calibration set build, restoring the dense weights between methods")
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
