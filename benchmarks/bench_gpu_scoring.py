"""Exact head scoring on an accelerator at real shapes, random weights (issue 14, part 4). Not for CI.

Builds a causal LM from a config written here (Llama-3-8B's shape: hidden 4096, 32 heads, 8 KV
heads, intermediate 14336, vocab 128256) with random weights, so no checkpoint is read or
copied to the machine, and a synthetic calibration set of random tokens (``--items`` items of
``--length`` tokens, the second half of each its target). ``--layers`` keeps only the first few
decoder layers (default 4 of 32) so a run takes a minute: the exact scorer's per-layer work has
the same shape at any depth, and :mod:`cap_lab.costmodel` scales the figures to 32 layers.
It measures and prints:

* **exact scoring throughput**: calibration tokens per second, masked-pass tokens per second
  (tokens x (1 + L*H) passes) and model FLOP/s (FLOPs counted by :func:`cap_lab.costmodel.exact_cost`),
  with the model FLOP utilisation against ``--peak-tflops`` (default: the dense bf16 peak of a
  recognised GPU; none on CPU);
* **head batching**: wall time and peak memory above the weights (CUDA) for 1, 2, 4, ... heads
  stacked per pass (the memory budget of :func:`cap_lab.scoring.exact.score_heads_exact` chosen to give
  that many);
* **1 vs N processes** (``--processes N``): the same scoring under torchrun with N ranks
  (:mod:`cap_lab.distributed`, one GPU each), against the cost model's slowest rank;
* the cost model's prediction at ``--tflops``/``--bandwidth-gbs`` (default: the H100-class
  profile on CUDA, a measurement on CPU) beside each measured time.

Usage::

    python benchmarks/bench_gpu_scoring.py                      # CUDA, bf16, Llama-3-8B shape, 4 layers
    python benchmarks/bench_gpu_scoring.py --processes 2        # and 2 ranks (needs 2 GPUs)
    python benchmarks/bench_gpu_scoring.py --reduced            # CPU, float32, a small Llama shape

The last line is machine-readable: ``tokens_per_s=<x> mfu=<y> best_heads_per_pass=<n>``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from cap_lab.calibration import CalibrationConfig, CalibrationItem, CalibrationSet
from cap_lab.costmodel import (
    H100_CLASS, CalibrationShape, ModelShape, Throughput, calibrate, exact_cost, exact_rank_costs,
)
from cap_lab.data import Example
from cap_lab.modeling import get_layout
from cap_lab.scoring.exact import activation_bytes_per_token, score_heads_exact

#: Meta-Llama-3-8B's config.json, the fields that set its shape and numerics
LLAMA_3_8B = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_theta=500000.0, hidden_act="silu", tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    pad_token_id=128001,
)
#: a Llama of the same proportions, small enough for a CPU run of a few seconds
REDUCED = dict(LLAMA_3_8B, vocab_size=8192, hidden_size=256, intermediate_size=896, num_attention_heads=8,
               num_key_value_heads=2, head_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
#: dense bf16 peak TFLOP/s of GPUs recognised by name
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def build_config(fields: dict):
    """The transformers config of ``fields`` (all its layers)."""
    from transformers import AutoConfig

    fields = dict(fields)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def build_model(fields: dict, layers: int, dtype: torch.dtype, device: str, seed: int = 0):
    """A causal LM with random weights from ``fields`` (first ``layers`` decoder layers), initialised on ``device``."""
    from transformers import AutoModelForCausalLM

    config = build_config(dict(fields, num_hidden_layers=layers))
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def synthetic_calibration(n_items: int, length: int, vocab: int, seed: int = 0) -> CalibrationSet:
    """``n_items`` items of ``length`` random tokens, the second half of each the target; K=1."""
    gen = torch.Generator().manual_seed(seed)
    items = tuple(
        CalibrationItem(Example("gsm8k", f"synthetic-{i}", "", ""), 0, 0,
                        tuple(torch.randint(3, vocab, (length,), generator=gen).tolist()), length // 2)
        for i in range(n_items))
    return CalibrationSet(CalibrationConfig(n_per_task=1, n_subsets=1, max_length=max(8, length)), "plain", items, 0)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_exact(model, calib, device: str, batch_size: int, memory_budget: int | None) -> dict:
    """Wall seconds and peak memory above the resident weights of one exact scoring run."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sync(device)
    start = time.perf_counter()
    result = score_heads_exact(model, calib, batch_size=batch_size, memory_budget=memory_budget, progress=False)
    sync(device)
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if device.startswith("cuda") else None
    return {"wall_s": wall, "peak_bytes": peak, "heads_per_pass": result.settings["heads_per_pass"][0],
            "finite": bool(result.scores.isfinite().all())}


def worker(args) -> int:
    """One rank under torchrun: score once (timed after a warm-up); rank 0 prints the result as JSON."""
    from cap_lab import distributed

    device = distributed.init_from_env(args.device) or args.device
    rank, world_size = distributed.world()
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    model = build_model(REDUCED if args.reduced else LLAMA_3_8B, args.layers, getattr(torch, args.dtype), device)
    calib = synthetic_calibration(args.items, args.length, model.config.vocab_size)
    score_heads_exact(model, synthetic_calibration(1, 16, model.config.vocab_size, seed=1), progress=False)  # warm-up
    distributed.barrier()
    run = timed_exact(model, calib, device, args.batch_size, None)
    if rank == 0:
        print("WORKER_RESULT " + json.dumps(dict(run, ranks=world_size)), flush=True)
    distributed.close()
    return 0


def run_processes(n: int, args, device: str) -> dict:
    """Launch this script under torchrun with ``n`` ranks; returns rank 0's result, or why not."""
    if device.startswith("cuda") and torch.cuda.device_count() < n:
        return {"error": f"{n} processes need {n} GPUs (one per rank); this machine has {torch.cuda.device_count()}"}
    forwarded = ["--worker", "--device", "cuda" if device.startswith("cuda") else "cpu", "--dtype", args.dtype,
                 "--layers", str(args.layers), "--items", str(args.items), "--length", str(args.length),
                 "--batch-size", str(args.batch_size)] + (["--reduced"] if args.reduced else [])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           os.path.abspath(__file__), *forwarded]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.process_timeout)
    for line in done.stdout.splitlines():
        if line.startswith("WORKER_RESULT "):
            return json.loads(line[len("WORKER_RESULT "):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": f"torchrun exited {done.returncode}: {' | '.join(tail)}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reduced", action="store_true", help="a small Llama shape on CPU in float32 (runs anywhere)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu (cpu with --reduced)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--layers", type=int, default=None, help="decoder layers kept (default 4; 2 with --reduced)")
    p.add_argument("--items", type=int, default=8, help="calibration items (default 8)")
    p.add_argument("--length", type=int, default=None, help="tokens per item (default 512; 64 with --reduced)")
    p.add_argument("--batch-size", type=int, default=8, help="items per chunk (default 8)")
    p.add_argument("--heads-per-pass", default=None,
                   help="comma-separated head counts to stack per pass (default 1, 2, 4, ... up to H)")
    p.add_argument("--processes", type=int, default=1, help="also run on this many ranks with torchrun (default 1: no)")
    p.add_argument("--process-timeout", type=float, default=600, help="seconds a torchrun run may take")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak matmul TFLOP/s for the MFU")
    p.add_argument("--tflops", type=float, default=None, help="throughput for the cost model (with --bandwidth-gbs)")
    p.add_argument("--bandwidth-gbs", type=float, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.reduced else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.layers = args.layers or (2 if args.reduced else 4)
    args.length = args.length or (64 if args.reduced else 512)
    if args.worker:
        return worker(args)
    device, dtype = args.device, getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = REDUCED if args.reduced else LLAMA_3_8B

    model = build_model(fields, args.layers, dtype, device)
    layout = get_layout(model)
    calib = synthetic_calibration(args.items, args.length, model.config.vocab_size)
    shape = ModelShape.from_config(model.config, "llama-3-8b" + (" (reduced)" if args.reduced else ""))
    profile = CalibrationShape.of(calib, args.batch_size)
    cost = exact_cost(shape, profile, dtype_bytes=dtype.itemsize, verify_replay=False)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    if args.tflops and args.bandwidth_gbs:
        throughput = Throughput(args.tflops * 1e12, args.bandwidth_gbs * 1e9, "given")
    elif device.startswith("cuda"):
        throughput = H100_CLASS
    else:
        throughput = calibrate(shape, rows=min(1024, args.batch_size * args.length), width=args.length, repeats=10,
                               dtype=dtype)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    peak_flops, peak_source = ((peak * 1e12, f"a {peak:g} TFLOP/s peak") if peak else
                               (None, "no known peak (pass --peak-tflops)"))
    print(f"device {name}, {args.dtype}, torch {torch.__version__}"
          f"{f', {torch.get_num_threads()} threads' if device == 'cpu' else ''}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"model: {shape.name}, random weights, {layout.num_layers} of {fields['num_hidden_layers']} layers, "
          f"{layout.num_heads} heads ({layout.num_kv_heads} KV, head_dim {layout.head_dim}), vocab {shape.vocab_size}; "
          f"{sum(t.numel() for t in model.parameters()) / 1e9:.2f}B parameters on the device")
    print(f"calibration: {args.items} random items of {args.length} tokens ({calib.n_target_tokens} targets), "
          f"batch_size {args.batch_size}; cost model: {cost.flops / 1e12:.1f} TFLOP, {cost.passes} passes; "
          f"throughput for predictions: {throughput.source}")

    score_heads_exact(model, synthetic_calibration(1, 16, shape.vocab_size, seed=1), progress=False)  # warm-up
    per_token = activation_bytes_per_token(model, layout, args.length)
    rows_width = min(args.batch_size, args.items) * args.length
    counts = ([int(x) for x in args.heads_per_pass.split(",")] if args.heads_per_pass else
              sorted({min(2 ** i, layout.num_heads) for i in range(layout.num_heads.bit_length() + 1)}))
    predicted = sum(cost.seconds(throughput))
    print(f"{'heads/pass':>10} {'wall_s':>8} {'pred_s':>8} {'calib tok/s':>12} {'pass tok/s':>11} "
          f"{'TFLOP/s':>8} {'MFU':>6} {'peak MiB':>9}")
    sweep = []
    for n in counts:
        run = timed_exact(model, calib, device, args.batch_size, n * rows_width * per_token)
        achieved = cost.flops / run["wall_s"]
        run.update(asked=n, calib_tokens_per_s=calib.n_tokens / run["wall_s"],
                   pass_tokens_per_s=calib.n_tokens * cost.passes / run["wall_s"], flops_per_s=achieved,
                   mfu=achieved / peak_flops if peak_flops else None)
        sweep.append(run)
        mfu = f"{run['mfu']:.1%}" if run["mfu"] is not None else "n/a"
        mem = f"{run['peak_bytes'] / 2**20:.0f}" if run["peak_bytes"] is not None else "n/a"
        print(f"{run['heads_per_pass']:>10} {run['wall_s']:8.2f} {predicted:8.2f} {run['calib_tokens_per_s']:12.1f} "
              f"{run['pass_tokens_per_s']:11.0f} {achieved / 1e12:8.3f} {mfu:>6} {mem:>9}", flush=True)
    best = min(sweep, key=lambda r: r["wall_s"])
    full = exact_cost(ModelShape.from_config(build_config(fields)), profile, dtype.itemsize, verify_replay=False)
    print(f"MFU against {peak_source}; predictions at {throughput.flops_per_s / 1e12:.4g} TFLOP/s; at the best "
          f"measured rate, all {fields['num_hidden_layers']} layers would take "
          f"{full.flops / best['flops_per_s']:.1f} s (cost model: {sum(full.seconds(throughput)):.1f} s)")

    processes = {}
    if args.processes > 1:
        ranks = exact_rank_costs(shape, profile, args.processes, dtype.itemsize, verify_replay=False)
        slowest = max(sum(r.seconds(throughput)) for r in ranks)
        result = run_processes(args.processes, args, device)
        processes = dict(result, predicted_s=slowest, one_process_s=best["wall_s"])
        if "error" in result:
            print(f"{args.processes} processes: not available: {result['error']}")
        else:
            print(f"{args.processes} processes: {result['wall_s']:.2f} s vs 1 process {best['wall_s']:.2f} s "
                  f"(speedup {best['wall_s'] / result['wall_s']:.2f}x; cost model: slowest rank {slowest:.2f} s, "
                  f"{predicted / slowest:.2f}x)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": name, "dtype": args.dtype, "date": time.strftime("%Y-%m-%d %H:%M"),
                       "args": vars(args), "cost_flops": cost.flops, "predicted_s": predicted,
                       "throughput": vars(throughput), "sweep": sweep, "processes": processes}, f, indent=1)
    mfu = f"{best['mfu']:.4f}" if best["mfu"] is not None else "nan"
    print(f"tokens_per_s={best['calib_tokens_per_s']:.1f} mfu={mfu} best_heads_per_pass={best['heads_per_pass']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
