"""Causal head scores of a loaded model, cached: :func:`head_scores`, the entry point (paper Sec. 3.2).

Methods (one module each, beside this one; all import :mod:`cap_lab.scoring.types`, none
imports another):

* ``exact`` (default): the reference's numbers, fast (:mod:`cap_lab.scoring.exact`: prefix
  reuse, head batching, target-only logits), resumable per layer from beside its cache entry;
* ``attribution``: a first-order estimate from one forward and one backward pass
  (:mod:`cap_lab.scoring.attribution`), an approximation;
* ``reference``: one masked pass per head (:mod:`cap_lab.scoring.reference`).

The score cache key holds the model identity (name and weight fingerprint), every calibration
setting, the resolved prompt style, a hash of every calibration item's token ids (so a changed
chat template or tokenizer with unchanged weights is a new entry), the method and
:data:`SCORING_VERSION`. The per-subset losses are stored, so either aggregate is served from
one entry. Scoring never changes weights: it runs with scoped hooks only, and no parameter gets
a gradient.

Under torchrun (:mod:`cap_lab.distributed`), every rank calls :func:`head_scores` with the same
arguments; ``exact`` and ``attribution`` split their work across the ranks, every rank returns
the same scores, and rank 0 alone writes the cache entry (the same key and losses as a
one-process run) and removes the progress folder. ``reference`` runs in one process only.
"""
from __future__ import annotations

import shutil
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from cap_lab import distributed, store
from cap_lab.calibration import CalibrationSet
from cap_lab.modeling import get_layout
from cap_lab.models import cache_root
from cap_lab.scoring.attribution import score_heads_attribution
from cap_lab.scoring.exact import score_heads_exact
from cap_lab.scoring.reference import score_heads_reference
from cap_lab.scoring.types import HeadScores, aggregate_scores, check_aggregate

SCORING_VERSION = "2"  # 2: the key covers the calibration token ids
#: ``exact`` (fast, the default), ``attribution`` (first-order estimate), ``reference`` (slow, obvious)
SCORING_METHODS = ("exact", "attribution", "reference")


def score_payload(identity: dict, calib: CalibrationSet, method: str) -> dict:
    """Everything that determines a score entry (its cache key)."""
    return {"model": identity, "calibration": calib.config.to_dict(), "style": calib.style,
            "tokens_sha256": calib.token_digest(), "method": method, "scoring_version": SCORING_VERSION}


def scores_root(cache_dir=None) -> Path:
    """Folder of the score entries: ``<cache_dir or cache_root()>/scores``."""
    return Path(cache_dir or cache_root()) / "scores"


def progress_dir(payload: dict, cache_dir=None) -> Path:
    """Folder of the per-layer progress of an unfinished ``exact`` run (beside its cache entry)."""
    entry = store.entry_folder(scores_root(cache_dir), payload)
    return entry.with_name(entry.name + ".progress")


def head_scores(
    lm, calib: CalibrationSet, *, method: str = "exact", aggregate: str = "median",
    batch_size: int = 8, memory_budget: int | None = None, use_cache: bool = True, force: bool = False,
    progress: bool = True, cache_dir=None,
) -> HeadScores:
    """Causal head scores of a loaded model, read from the score cache when present.

    The cache key is :func:`score_payload` (see the module docstring). An entry is served only
    if its checksums hold and its losses are finite with shapes (K, L, H) and (K,); a damaged
    one is reported in one line and recomputed (:mod:`cap_lab.store`). An ``exact`` run writes
    its progress per layer beside the entry (:func:`progress_dir`); a run stopped midway
    resumes there, and the progress is removed once the entry is written.

    With a process group (torchrun; :func:`cap_lab.distributed.init_from_env`) every rank must
    make this call with the same arguments and the same cache folder (one filesystem): each
    scores its share, all return the same scores, rank 0 writes the entry. If a rank dies, the
    others fail at their next collective instead of waiting; rerunning resumes from the layers
    finished (by any rank) before.

    Args:
        lm: a :class:`cap_lab.models.LoadedModel`.
        calib: the calibration set (built with ``lm.tokenizer``).
        method: ``exact`` (default, fast), ``attribution`` (first-order estimate) or
            ``reference`` (one masked pass per head).
        aggregate: ``median`` or ``mean``.
        batch_size: calibration items per forward (per chunk for ``exact``).
        memory_budget: bytes of activations per masked pass (``exact``; default: 1 GiB on
            CPU, half the free memory on CUDA).
        use_cache: read and write the cache (and the progress of ``exact``).
        force: recompute even when cached (and discard any saved progress).
        progress: progress bars.
        cache_dir: cache root (default :func:`cap_lab.models.cache_root`).
    """
    if method not in SCORING_METHODS:
        raise ValueError(f"scoring method {method!r}; allowed: {', '.join(SCORING_METHODS)}")
    check_aggregate(aggregate)
    rank, world_size = distributed.world()
    if method == "reference" and world_size > 1:
        raise ValueError(f"scoring method 'reference' runs in one process, not on {world_size} ranks; "
                         "launch it without torchrun, or use 'exact'")
    payload = score_payload(lm.identity(), calib, method)
    distributed.check_same_on_all_ranks("score cache key (model weights or calibration items)", payload)
    layout, k = get_layout(lm.model), calib.config.n_subsets
    shapes = {"masked_losses": (k, layout.num_layers, layout.num_heads), "intact_losses": (k,)}
    if use_cache and not force:
        hit = store.load(scores_root(cache_dir), payload, shapes=shapes)
        if distributed.all_true(hit is not None):  # a rank that missed makes every rank compute
            t = hit.tensors
            settings = dict(hit.metadata, payload=hit.payload, key=hit.folder.name, path=str(hit.folder))
            return HeadScores(aggregate_scores(t["masked_losses"], t["intact_losses"], aggregate),
                              t["masked_losses"], t["intact_losses"], aggregate, settings)
    checkpoints = progress_dir(payload, cache_dir) if use_cache else None
    if checkpoints is not None and force and rank == 0:  # before the scorer's first collective
        shutil.rmtree(checkpoints, ignore_errors=True)
    if method == "exact":
        result = score_heads_exact(lm.model, calib, aggregate=aggregate, batch_size=batch_size,
                                   memory_budget=memory_budget, checkpoint_dir=checkpoints, progress=progress)
    elif method == "attribution":
        result = score_heads_attribution(lm.model, calib, aggregate=aggregate, batch_size=batch_size, progress=progress)
    else:
        result = score_heads_reference(lm.model, calib, aggregate=aggregate, batch_size=batch_size, progress=progress)
    settings = dict(result.settings, method=method, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    n_tokens=calib.n_tokens, n_target_tokens=calib.n_target_tokens)
    if use_cache:
        folder = store.entry_folder(scores_root(cache_dir), payload)
        if rank == 0:
            folder = store.save(scores_root(cache_dir), payload, settings,
                                tensors={"masked_losses": result.masked_losses, "intact_losses": result.intact_losses})
            shutil.rmtree(checkpoints, ignore_errors=True)
        distributed.barrier()  # the entry exists when any rank returns
        settings = dict(settings, payload=payload, key=folder.name, path=str(folder))
    return replace(result, settings=settings)
