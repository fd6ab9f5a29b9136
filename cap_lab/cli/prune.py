"""``cap-lab prune``: prune a model with CAP or a baseline and save the checkpoint."""
from __future__ import annotations

import json
import time

import torch

from cap_lab.calibration import build_calibration_set
from cap_lab.cli.common import add_calibration_args, add_model_args, calibration_config_from_args, load_model_from_args
from cap_lab.pruning import KV_REDUCE, MAGNITUDE_SCOPES, PRUNE_METHODS, PruneConfig, prune_model, sparsity_by
from cap_lab.saving import save_pruned
from cap_lab.scoring import head_scores


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a model and save it")
    add_model_args(p)
    add_calibration_args(p)
    p.add_argument("--method", default="cap", help=f"one of {', '.join(PRUNE_METHODS)}")
    p.add_argument("--sparsity", type=float, required=True, help="target sparsity in [0, 1)")
    p.add_argument("--kv-reduce", default="mean", help=f"GQA k/v factor: {', '.join(KV_REDUCE)}")
    p.add_argument("--magnitude-scope", default="global", help=f"{', '.join(MAGNITUDE_SCOPES)}")
    p.add_argument("--scores", default=None, help="scores.json from `cap-lab score` (else scored/cached here)")
    p.add_argument("--out", required=True, help="output folder for the pruned checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=run)


def run(args) -> int:
    config = PruneConfig(method=args.method, sparsity=args.sparsity, kv_reduce=args.kv_reduce,
                         magnitude_scope=args.magnitude_scope, seed=args.seed)
    calib_config = calibration_config_from_args(args)
    start = time.perf_counter()
    lm = load_model_from_args(args)
    calib, scores, score_key = None, None, None
    if config.method in ("cap", "wanda"):
        calib = build_calibration_set(lm.tokenizer, calib_config, args.data_dir)
    if config.method == "cap":
        if args.scores:
            data = json.loads(open(args.scores).read())
            scores = torch.tensor(data["scores"])
            score_key = data.get("settings", {}).get("key")
        else:
            result = head_scores(lm, calib, batch_size=args.batch_size)
            scores, score_key = result.scores, result.settings.get("key")
    source_identity = lm.identity()
    result = prune_model(lm.model, config, head_scores=scores, calib=calib, batch_size=args.batch_size)
    by_matrix = sparsity_by(result.report, "matrix")
    print(by_matrix.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print(f"{config.method}: target sparsity {config.sparsity:.4f}, achieved {result.achieved_sparsity:.6f} "
          f"of {result.total} prunable weights")
    meta = dict(result.summary(), source_model=source_identity, score_cache_key=score_key,
                calibration=calib_config.to_dict() if calib is not None else None)
    path = save_pruned(lm.model, lm.tokenizer, args.out, meta, overwrite=args.overwrite)
    print(f"pruned checkpoint written to {path} in {time.perf_counter() - start:.1f} s")
    return 0
