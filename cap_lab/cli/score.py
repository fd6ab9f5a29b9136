"""``cap-lab score``: causal head scores of a model on the calibration set.

Writes the scores JSON of :mod:`cap_lab.cli.scores_json` (atomically) to ``--out``, with the
scored model's identity, so ``cap-lab prune --scores`` can refuse scores of another model.

Under torchrun (``torchrun --nproc-per-node N -m cap_lab.cli score ...``) every rank loads the
model and scores its share of the layers (exact) or batches (attribution), see
:mod:`cap_lab.distributed`; rank 0 alone prints and writes ``--out``.
"""
from __future__ import annotations

import json
import sys
import time
from datetime import timedelta

from cap_lab import distributed
from cap_lab.calibration import build_calibration_set
from cap_lab.cli.checks import check_data_source, check_output_file, positive_float
from cap_lab.cli.common import add_calibration_args, add_model_args, calibration_config_from_args, load_model_from_args
from cap_lab.cli.scores_json import scores_to_json
from cap_lab.io import atomic_write_text
from cap_lab.scoring import AGGREGATES, SCORING_METHODS, head_scores


def add_parser(sub) -> None:
    p = sub.add_parser("score", help="score every attention head by masking it (paper Eq. 1-2); resumes if interrupted")
    add_model_args(p)
    add_calibration_args(p)
    p.add_argument("--method", choices=SCORING_METHODS, default="exact",
                   help=f"one of {', '.join(SCORING_METHODS)} (default exact: fast, same numbers as reference; "
                        "attribution: one backward, an approximation)")
    p.add_argument("--aggregate", choices=AGGREGATES, default="median", help=f"one of {', '.join(AGGREGATES)}")
    p.add_argument("--memory-budget-mb", type=positive_float, default=None,
                   help="activation memory per masked pass of the exact scorer (default: 1024 on CPU, half the free GPU memory)")
    p.add_argument("--out", default="scores.json", help="the JSON file to write the scores to")
    p.add_argument("--force", action="store_true", help="recompute even if cached")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the score cache")
    p.add_argument("--dist-timeout-min", type=positive_float, default=30.0,
                   help="under torchrun: minutes a rank waits for the others before failing (default 30)")
    p.set_defaults(run=run)


def run(args) -> int:
    config = calibration_config_from_args(args)  # every check before the slow load
    out = check_output_file(args.out)
    check_data_source(args.data_dir)
    budget = None if args.memory_budget_mb is None else int(args.memory_budget_mb * 2**20)
    start = time.perf_counter()
    args.device = distributed.init_from_env(args.device, device_map=args.device_map,
                                            timeout=timedelta(minutes=args.dist_timeout_min))
    try:
        lm = load_model_from_args(args)
        calib = build_calibration_set(lm.tokenizer, config, args.data_dir)
        result = head_scores(lm, calib, method=args.method, aggregate=args.aggregate, batch_size=args.batch_size,
                             memory_budget=budget, use_cache=not args.no_cache, force=args.force)
        if distributed.world()[0] == 0:
            atomic_write_text(out, json.dumps(scores_to_json(result, lm, calib), indent=1, default=str))
            report(result, lm, calib, out, time.perf_counter() - start)
    finally:
        distributed.close()
    return 0


def report(result, lm, calib, out, seconds: float) -> None:
    """What ``cap-lab score`` prints: the calibration set, the top heads, where the scores went."""
    config = calib.config
    print(f"calibration: {len(calib.items)} examples, {calib.n_tokens} tokens ({calib.n_target_tokens} target), "
          f"K={config.n_subsets}, style={calib.style}")
    s = result.scores
    if not s.isfinite().all():
        print(f"cap-lab: warning: {int((~s.isfinite()).sum())} of {s.numel()} scores are NaN or infinite; "
              "cap-lab prune will refuse them", file=sys.stderr)
    flat = s.flatten().argsort(descending=True)[:5]
    top = ", ".join(f"L{int(i) // s.shape[1]}H{int(i) % s.shape[1]}={float(s.flatten()[i]):+.4f}" for i in flat)
    print(f"intact loss per subset: {[round(float(x), 4) for x in result.intact_losses]}")
    print(f"top heads: {top}")
    print(f"scores ({s.shape[0]} layers x {s.shape[1]} heads) of model {lm.name} (fingerprint {lm.fingerprint}) "
          f"written to {out} in {seconds:.1f} s")
    if "path" in result.settings:
        print(f"score cache entry: {result.settings['path']}")
