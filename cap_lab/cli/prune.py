"""``cap-lab prune``: prune a model with CAP or a baseline and save the checkpoint.

Before loading the model it checks ``--out`` (:func:`cap_lab.saving.check_output_folder`: a
new folder, or with ``--overwrite`` a checkpoint cap_lab wrote), the ``--scores`` file (valid,
finite) and the data source; right after loading, that the scores were computed on these
weights (same fingerprint) before any calibration or pruning work.

``cap_lab.json`` records where the scores came from (``scores``: file, method, aggregate,
calibration...) and, as ``calibration``, the calibration settings that produced what was used:
the scores' own for ``cap`` (from the scores file, not this command's calibration flags, which
``--scores`` leaves unused), the calibration set built here for ``wanda`` and ``sparsegpt``.

``--nm 2:4`` (or 4:8) prunes to the N:M pattern with the method's own score and fixes the
sparsity at (M - N) / M (``--sparsity`` may then be omitted); the pattern is checked in every
prunable matrix before saving. ``--owl`` allocates ``--sparsity`` over the layers by their
outlier ratios (OWL; needs the calibration set, for every method).

CAP variants (:class:`cap_lab.pruning.PruneConfig`; ``--method cap`` only, refused otherwise):
``--cap-mlp-factors neuron`` gives every MLP neuron's gate/up row and down column its own
factor, from neuron scores computed here on the calibration set
(:func:`cap_lab.scoring.neurons.score_neurons_attribution`, recorded as ``neuron_scores`` in
``cap_lab.json``); ``--cap-activation`` scores ``|W_ij| * ||X_j||_2 * I`` with input norms from
the dense model on the calibration set; ``--cap-scope layer`` prunes every decoder layer to
``--sparsity`` with its own threshold instead of one global threshold, and ``--cap-scope row``
every output row of every matrix (Wanda's comparison group).

``--method cap_heads`` removes whole heads by their causal scores (:mod:`cap_lab.head_pruning`,
paper Sec. 6); it prints the heads it removed and the achieved sparsity, which is close to but
not exactly ``--sparsity``. ``--calib-source wikitext2`` calibrates on WikiText-2 windows instead
of the reasoning tasks (:mod:`cap_lab.calibration`, paper Sec. 6), for the scores and every
method that uses the calibration set.
"""
from __future__ import annotations

import argparse
import sys
import time

from cap_lab.calibration import build_calibration_set
from cap_lab.cap_scores import MLP_FACTORS
from cap_lab.cli.checks import check_data_source, device, fraction, int_at_least, positive_float
from cap_lab.cli.common import add_calibration_args, add_model_args, calibration_config_from_args, load_model_from_args
from cap_lab.cli.scores_json import check_scores_fit, read_scores_json, score_provenance
from cap_lab.modeling import get_layout
from cap_lab.pruning import CAP_SCOPES, KV_REDUCE, MAGNITUDE_SCOPES, PRUNE_METHODS, PruneConfig, prune_model, sparsity_by
from cap_lab.saving import check_output_folder, save_pruned
from cap_lab.scoring import head_scores, score_neurons_attribution
from cap_lab.selection import check_nm, nm_group_nonzeros
from cap_lab.sparsity_allocation import OWL_LAMBDA, OWL_M

SEQUENTIAL = ("wanda", "sparsegpt")  # methods that prune layer by layer from calibration inputs


def nm_pattern(text: str) -> tuple[int, int]:
    """An argparse type: ``N:M`` with integers 0 < N < M (keep N of every M), e.g. ``2:4``."""
    try:
        n, m = (int(part) for part in text.split(":"))
        return check_nm((n, m))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an N:M pattern; give integers 0 < N < M as N:M, "
                                         "e.g. 2:4 or 4:8") from None


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a model and save it")
    add_model_args(p)
    add_calibration_args(p)
    p.add_argument("--method", choices=PRUNE_METHODS, default="cap", help=f"one of {', '.join(PRUNE_METHODS)}")
    p.add_argument("--sparsity", type=fraction, default=None,
                   help="target sparsity in [0, 1) (required unless --nm, which fixes it at (M - N) / M)")
    p.add_argument("--nm", type=nm_pattern, default=None,
                   help="N:M semi-structured sparsity, e.g. 2:4 or 4:8: keep N of every M consecutive inputs of each row")
    p.add_argument("--owl", action="store_true",
                   help="OWL layer-wise sparsity: layers with more outliers are pruned less (mean = --sparsity)")
    p.add_argument("--owl-lambda", type=fraction, default=OWL_LAMBDA,
                   help=f"owl: every layer within --sparsity +/- lambda (default {OWL_LAMBDA})")
    p.add_argument("--owl-m", type=positive_float, default=OWL_M,
                   help=f"owl: a Wanda score above M x its layer's mean is an outlier (default {OWL_M:g})")
    p.add_argument("--kv-reduce", choices=KV_REDUCE, default="mean", help=f"GQA k/v factor: {', '.join(KV_REDUCE)}")
    p.add_argument("--magnitude-scope", choices=MAGNITUDE_SCOPES, default="global", help=f"{', '.join(MAGNITUDE_SCOPES)}")
    p.add_argument("--cap-mlp-factors", choices=MLP_FACTORS, default="layer_mean",
                   help="cap: MLP weights get the layer's mean head factor (layer_mean, paper) or their neuron's "
                        "(neuron: scored here by attribution patching on the calibration set)")
    p.add_argument("--cap-activation", action="store_true",
                   help="cap: score |W_ij| * ||X_j||_2 * I (input norms of the dense model on the calibration set)")
    p.add_argument("--cap-scope", choices=CAP_SCOPES, default="global",
                   help="cap: one global threshold, one per decoder layer (each layer pruned to --sparsity), or per "
                        "output row (every row pruned to --sparsity, Wanda's comparison group)")
    p.add_argument("--sparsegpt-block-size", type=int_at_least(1), default=128,
                   help="sparsegpt: columns per block (mask selection and lazy OBS updates; paper: 128)")
    p.add_argument("--sparsegpt-damping", type=fraction, default=0.01,
                   help="sparsegpt: fraction of the mean Hessian diagonal added to it (paper: 0.01)")
    p.add_argument("--scores", default=None,
                   help="scores JSON from `cap-lab score` on the same model (--method cap, cap_heads; else scored/cached "
                        "here). The calibration flags still choose the set of wanda, sparsegpt, --owl, --cap-activation "
                        "and --cap-mlp-factors neuron")
    p.add_argument("--out", required=True, help="output folder for the pruned checkpoint (a new folder)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a checkpoint written by cap_lab (never any other folder)")
    p.add_argument("--execution-device", type=device, default=None,
                   help="wanda, sparsegpt, --owl, --cap-activation: keep the model where --device put it (e.g. "
                        "cpu) and run each decoder layer on this device one at a time (for models larger than the GPU)")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.sparsity is None and args.nm is None:
        raise ValueError("prune: --sparsity is required (or --nm N:M, which fixes the sparsity at (M - N) / M)")
    config = PruneConfig(method=args.method, sparsity=args.sparsity, kv_reduce=args.kv_reduce,
                         magnitude_scope=args.magnitude_scope, seed=args.seed,
                         sparsegpt_block_size=args.sparsegpt_block_size, sparsegpt_damping=args.sparsegpt_damping,
                         nm=args.nm, owl=args.owl, owl_lambda=args.owl_lambda, owl_m=args.owl_m,
                         cap_mlp_factors=args.cap_mlp_factors, cap_activation=args.cap_activation, cap_scope=args.cap_scope)
    if args.scores and config.method not in ("cap", "cap_heads"):
        print(f"cap-lab: warning: --scores is used by --method cap and cap_heads only; {config.method} ignores it",
              file=sys.stderr)
    if args.execution_device and config.method not in SEQUENTIAL and not config.owl and not config.cap_activation:
        what = ("neuron scoring runs where --device put the model" if config.cap_mlp_factors == "neuron"
                else f"{config.method} runs no forward pass")
        print(f"cap-lab: warning: --execution-device is used by --method wanda and sparsegpt (and --owl, "
              f"--cap-activation) only; {what}", file=sys.stderr)
    calib_config = calibration_config_from_args(args)
    out = check_output_folder(args.out, args.overwrite)  # every check before the slow load
    scored = config.method in ("cap", "cap_heads")  # methods that use head scores
    scores_file = read_scores_json(args.scores) if args.scores and scored else None
    needs_calib = (config.method in SEQUENTIAL or config.owl or (scored and scores_file is None)
                   or config.cap_activation or config.cap_mlp_factors == "neuron")
    if needs_calib:
        check_data_source(args.data_dir)
    start = time.perf_counter()
    lm = load_model_from_args(args)
    if scores_file is not None:
        check_scores_fit(scores_file, lm)
        if scores_file.model is None:
            print(f"cap-lab: warning: {scores_file.path} does not record the model it was computed on; "
                  "its scores are used unchecked", file=sys.stderr)
    source_identity = lm.identity()
    calib, scores, provenance = None, None, None
    if needs_calib:
        calib = build_calibration_set(lm.tokenizer, calib_config, args.data_dir)
    if scores_file is not None:
        scores, provenance = scores_file.scores, dict(scores_file.provenance, model=scores_file.model)
    elif scored:
        result = head_scores(lm, calib, batch_size=args.batch_size)
        scores, provenance = result.scores, dict(score_provenance(result, calib), model=source_identity)
    neurons, neuron_provenance = None, None
    if config.cap_mlp_factors == "neuron":
        scored = score_neurons_attribution(lm.model, calib, batch_size=args.batch_size)
        neurons = scored.per_layer()
        neuron_provenance = dict(scored.settings, aggregate=scored.aggregate, calibration=calib.config.to_dict())
    result = prune_model(lm.model, config, head_scores=scores, calib=calib, batch_size=args.batch_size,
                         execution_device=args.execution_device, neuron_scores=neurons)
    by_matrix = sparsity_by(result.report, "matrix")
    print(by_matrix.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print(f"{config.method}: target sparsity {config.sparsity:.4f}, achieved {result.achieved_sparsity:.6f} "
          f"of {result.total} prunable weights")
    if config.nm is not None:
        n, m = config.nm
        matrices = [mod.weight for _, _, mod in get_layout(lm.model).linear_weights(lm.model)]
        broken = sum(int((nm_group_nonzeros(w, m) > n).any()) for w in matrices)
        if broken:  # an internal error, never a user's: refuse to save a checkpoint that is not N:M
            raise RuntimeError(f"{broken} of {len(matrices)} matrices break the {n}:{m} pattern")
        print(f"{n}:{m} pattern: at most {n} non-zeros in every group of {m} inputs, in all {len(matrices)} matrices")
    if result.removed_heads is not None:
        removed = result.removed_heads.nonzero().tolist()
        print(f"cap_heads: removed {len(removed)} of {result.removed_heads.numel()} heads: "
              f"{' '.join(f'L{l}H{h}' for l, h in removed) or 'none'}")
    if result.allocation is not None:
        shares = result.allocation.layer_sparsity
        print(f"owl: layer sparsities {float(shares.min()):.4f}..{float(shares.max()):.4f} (lambda {config.owl_lambda:g}, "
              f"M {config.owl_m:g}); by layer: {' '.join(f'{x:.3f}' for x in shares.tolist())}")
    calibration = provenance["calibration"] if provenance else calib.config.to_dict() if calib is not None else None
    meta = dict(result.summary(), source_model=source_identity, scores=provenance, calibration=calibration,
                score_cache_key=provenance["cache_key"] if provenance else None, neuron_scores=neuron_provenance,
                activation_calibration=calib.config.to_dict() if config.cap_activation else None)
    path = save_pruned(lm.model, lm.tokenizer, out, meta, overwrite=args.overwrite)
    print(f"pruned checkpoint written to {path} in {time.perf_counter() - start:.1f} s")
    return 0
