"""``cap-lab plan``: what scoring a model's heads will cost, before running it (issue 14).

Reads only the model's config (no weights): a built-in shape (``llama-3-8b``, ``mistral-7b``),
an alias's cached ``config.json``, a folder, a config file or a hub id. The calibration set's
token lengths come from tokenizing the real calibration examples (the same flags as
``cap-lab score``) with the model's tokenizer, or the default model's as a stand-in when the
model has none here; ``--assume-length`` skips that. Prints, per scorer, the FLOPs, the logit
memory traffic and the predicted wall time of :mod:`cap_lab.costmodel` at a stated throughput:
an assumed H100/H200-class accelerator (default), a given one (``--tflops``,
``--bandwidth-gbs``), or this machine measured for a few seconds (``--calibrate``).

Example::

    cap-lab plan --model llama-3-8b                      # paper profile: 128 per task, K=3, 512 tokens
    cap-lab plan --model gemma3-270m --calib-per-task 1 --subsets 1 --max-length 64 --calibrate
"""
from __future__ import annotations

from pathlib import Path

import torch

from cap_lab.calibration import build_calibration_set
from cap_lab.cli.checks import datasets_installed, device, int_at_least, positive_float
from cap_lab.cli.common import add_calibration_args, calibration_config_from_args
from cap_lab.costmodel import (
    BUILTIN_SHAPES, H100_CLASS, CalibrationShape, Throughput, calibrate, exact_rank_costs, format_table, load_shape,
    predict,
)
from cap_lab.data import resolve_data_dir
from cap_lab.models import ALIASES, DEFAULT_MODEL, alias_cache_dir

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TARGET_FRACTION = 0.5  # of an item's tokens, when lengths are assumed rather than measured
CALIBRATION_FLOPS = 4e9  # about this many FLOPs per timed decoder-layer call of --calibrate


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="predict the FLOPs and wall time of reference, exact and attribution scoring "
                                    "from a model's config (no weights loaded)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in shape ({', '.join(BUILTIN_SHAPES)}), alias, folder, config.json or hub id "
                        f"(default {DEFAULT_MODEL})")
    add_calibration_args(p)
    p.add_argument("--tokenizer", default=None,
                   help="alias or folder whose tokenizer measures the calibration lengths (default: the model's "
                        f"own, else {DEFAULT_MODEL}'s as a stand-in)")
    p.add_argument("--assume-length", type=int_at_least(2), default=None,
                   help=f"do not tokenize: every item this many tokens, {TARGET_FRACTION:.0%} of them targets")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this machine: a random decoder layer of the model's architecture and a log-softmax "
                        "over its vocabulary (seconds)")
    p.add_argument("--device", type=device, default="cpu", help="where --calibrate measures: cpu (default) or cuda")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch threads for --calibrate")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="what --calibrate times: wall seconds (default), or this process's CPU seconds, for a "
                        "machine busy with other work (with --threads 1: the seconds the scoring needs a core for)")
    p.add_argument("--tflops", type=positive_float, default=None, help="effective model TFLOP/s (with --bandwidth-gbs)")
    p.add_argument("--bandwidth-gbs", type=positive_float, default=None,
                   help="effective GB/s of elementwise passes over logits (with --tflops)")
    p.add_argument("--processes", type=int_at_least(1), default=1,
                   help="also predict the exact scorer on this many ranks (torchrun, one device each)")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default=None,
                   help="dtype of model and logits (default: float32 with --calibrate on cpu, else bfloat16)")
    p.set_defaults(run=run)


def _tokenizer_folder(name: str) -> Path | None:
    """The folder holding ``name``'s tokenizer here, or ``None``."""
    folder = alias_cache_dir(name) if name in ALIASES else Path(name).expanduser()
    if folder.is_file():
        folder = folder.parent
    if folder.is_dir() and any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return folder
    return None


def calibration_profile(args) -> tuple[CalibrationShape, str]:
    """The calibration set's token counts and a line saying where they come from."""
    config = calibration_config_from_args(args)
    n_items = len(config.tasks) * config.n_per_task
    described = (f"{n_items} items ({config.n_per_task} per task x {len(config.tasks)} tasks, K={config.n_subsets}, "
                 f"max_length {config.max_length}, batch_size {args.batch_size})")

    def assumed(length: int, why: str) -> tuple[CalibrationShape, str]:
        shape = CalibrationShape.uniform(n_items, length, TARGET_FRACTION, args.batch_size)
        return shape, (f"{described}: ASSUMED {length} tokens per item, {TARGET_FRACTION:.0%} targets ({why}); "
                       f"{shape.n_tokens} tokens, {shape.n_targets} target tokens")

    if args.assume_length:
        return assumed(args.assume_length, "--assume-length")
    if args.tokenizer is not None:
        folder = _tokenizer_folder(args.tokenizer)
        if folder is None:
            raise ValueError(f"--tokenizer {args.tokenizer!r} is neither a converted alias nor a folder with a tokenizer")
        source = args.tokenizer
    else:
        source = args.model if _tokenizer_folder(args.model) else DEFAULT_MODEL
        folder = _tokenizer_folder(source)
        if folder is None:
            return assumed(config.max_length, f"no tokenizer here for {args.model} or {DEFAULT_MODEL}")
    data_dir = resolve_data_dir(args.data_dir)
    if data_dir is None and not datasets_installed():
        return assumed(config.max_length, "no data: set CAP_LAB_DATA or --data-dir")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    calib = build_calibration_set(tokenizer, config, data_dir)
    shape = CalibrationShape.of(calib, args.batch_size)
    stand_in = "" if source == args.model else f" (a stand-in for {args.model}'s)"
    return shape, (f"{described}: {shape.n_tokens} tokens, {shape.n_targets} target tokens, lengths "
                   f"{min(shape.lengths)}-{max(shape.lengths)} measured with {source}'s tokenizer{stand_in}")


def run(args) -> int:
    if args.calibrate and (args.tflops is not None or args.bandwidth_gbs is not None):
        raise ValueError("--calibrate measures this machine; give either it or --tflops/--bandwidth-gbs, not both")
    if (args.tflops is None) != (args.bandwidth_gbs is None):
        raise ValueError(f"--tflops {args.tflops} and --bandwidth-gbs {args.bandwidth_gbs}: give both or neither")
    dtype = args.dtype or ("float32" if args.calibrate and args.device == "cpu" else "bfloat16")
    shape = load_shape(args.model)
    calib, calib_line = calibration_profile(args)
    if args.calibrate:
        if args.threads:
            torch.set_num_threads(args.threads)
        batch_tokens = max(len(b) * max(calib.lengths[i] for i in b) for b in calib.batches())
        width = sorted(calib.lengths)[len(calib.lengths) // 2]  # the median item
        rows = max(width, min(batch_tokens, int(CALIBRATION_FLOPS // shape.linear_flops)))
        throughput = calibrate(shape, rows=rows, width=width, repeats=5, dtype=getattr(torch, dtype),
                               device=args.device, clock="process" if args.clock == "cpu" else "wall")
    elif args.tflops is not None:
        throughput = Throughput(args.tflops * 1e12, args.bandwidth_gbs * 1e9,
                                f"given: {args.tflops:g} TFLOP/s, {args.bandwidth_gbs:g} GB/s")
    else:
        throughput = H100_CLASS
    predictions = predict(shape, calib, throughput, DTYPE_BYTES[dtype])

    windows = sorted({w for w in shape.windows if w})
    print(f"model {shape.name}: {shape.num_layers} layers x {shape.num_heads} heads ({shape.num_kv_heads} KV, "
          f"head_dim {shape.head_dim}), hidden {shape.hidden_size}, intermediate {shape.intermediate_size}, vocab "
          f"{shape.vocab_size}{', sliding window ' + str(windows) if windows else ''}"
          f"{', logit soft-capping' if shape.logit_softcapping else ''}; {shape.parameters / 1e9:.2f}B parameters "
          "in decoder layers and LM head; logits in " + dtype)
    print(f"calibration: {calib_line}")
    grad = (f", {throughput.grad_rate / 1e12:.4g} with backward, {throughput.lm_head_rate / 1e12:.4g} LM head"
            if throughput.grad_flops_per_s is not None else "")
    print(f"throughput: {throughput.flops_per_s / 1e12:.4g} TFLOP/s forward{grad}, {throughput.bytes_per_s / 1e9:.4g} "
          f"GB/s logit passes ({throughput.source})")
    print(format_table(predictions))
    if args.processes > 1:
        ranks = exact_rank_costs(shape, calib, args.processes, DTYPE_BYTES[dtype])
        slowest = max(sum(r.seconds(throughput)) for r in ranks)
        print(f"exact on {args.processes} ranks (torchrun, one device each): slowest rank {slowest:.2f} s, speedup "
              f"{predictions['exact'].seconds / slowest:.2f}x, {args.processes * slowest / 3600:.3f} device-hours in all "
              "(every rank runs the intact capture pass)")
    print("assumptions: FLOPs = 2 per multiply-add of the linear projections, causal (and windowed) attention and "
          "the LM head; reference: 1 + L*H full forwards, LM head and cross-entropy at every position; exact: "
          "layers l..L-1 per head of layer l, LM head at target positions; attribution: forward + input-gradient "
          "backward; time = FLOPs / throughput + logit bytes / bandwidth, one device, nothing overlapped, Python "
          "overhead not counted")
    return 0
