"""Causal head scores (paper Sec. 3.2, Eq. 1-2).

For head h of layer l, with the calibration set split into K disjoint subsets D_1..D_K and
L(M; D_k) the token-level mean target cross-entropy of model M on subset k::

    s_{l,h} = median_k L(M with head (l,h) masked; D_k)  -  mean_k L(M; D_k)

``aggregate="mean"`` replaces the median by the mean (the paper's Sec. 6 ablation). For even K
the median is the mean of the two middle values. Masking zeroes the head's slice of the
attention output just before ``o_proj`` (:func:`cap_lab.hooks.mask_heads`).

With few subsets the two terms use different statistics of the same K losses, so every score
carries about the same offset ``median_k L(M; D_k) - mean_k L(M; D_k)``: on the default model
with the ``cpu`` profile's calibration set (K=3, intact losses 2.60, 2.20, 2.10) it is -0.10
nats, and most heads score below zero although masking them raises the loss. The offset drops
out of the min-max importance factors (Eq. 3), so pruning is unaffected; read signs with it in
mind, or compare ``masked_losses`` with ``intact_losses`` per subset.

:func:`score_heads_reference` is the obvious exact implementation: one masked forward per head
over the whole calibration set (L x H passes). It is the reference that faster scorers are
checked against. :func:`head_scores` is the cached entry point used by the command line and
the notebooks; its methods are

* ``exact`` (default): the same numbers, fast (:mod:`cap_lab.fast_scoring`: prefix reuse, head
  batching, target-only logits), resumable per layer from the score cache's folder;
* ``attribution``: a first-order estimate from one forward and one backward pass
  (:mod:`cap_lab.attribution`), an approximation;
* ``reference``: :func:`score_heads_reference`.

:func:`compare_scores` (:mod:`cap_lab.compare`) reports how two score sets agree. Scoring
never changes weights: it runs with scoped hooks only, and no parameter gets a gradient.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import torch
from torch import nn
from tqdm.auto import tqdm

from cap_lab import cache
from cap_lab.adapters import get_layout, model_device
from cap_lab.calibration import CalibrationSet
from cap_lab.compare import ScoreAgreement, compare_scores  # noqa: F401  (public here)
from cap_lab.hooks import mask_heads
from cap_lab.losses import target_loss_sums

SCORING_VERSION = "1"
AGGREGATES = ("median", "mean")
#: ``exact`` (fast, the default), ``attribution`` (first-order estimate), ``reference`` (slow, obvious)
SCORING_METHODS = ("exact", "attribution", "reference")


@dataclass(frozen=True)
class HeadScores:
    """Causal scores of every head, with what made them.

    Attributes:
        scores: (L, H) causal scores (Eq. 2); higher means masking hurts more.
        masked_losses: (K, L, H) mean target loss of each subset with each head masked
            (for ``attribution``: the intact loss plus the first-order estimate of the change).
        intact_losses: (K,) mean target loss of each subset, nothing masked.
        aggregate: ``median`` or ``mean`` over subsets.
        settings: model identity, calibration config, method and versions.
    """

    scores: torch.Tensor
    masked_losses: torch.Tensor
    intact_losses: torch.Tensor
    aggregate: str = "median"
    settings: dict = field(default_factory=dict)

    def with_aggregate(self, aggregate: str) -> "HeadScores":
        """The same losses aggregated with ``median`` or ``mean``."""
        return replace(self, aggregate=aggregate, scores=aggregate_scores(self.masked_losses, self.intact_losses, aggregate))

    def per_subset(self) -> torch.Tensor:
        """(K, L, H) single-subset estimates: masked loss minus that subset's intact loss."""
        return self.masked_losses - self.intact_losses.view(-1, 1, 1)


def aggregate_scores(masked_losses: torch.Tensor, intact_losses: torch.Tensor, aggregate: str = "median") -> torch.Tensor:
    """Eq. 2. masked_losses: (K, L, H); intact_losses: (K,). Returns (L, H)."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate={aggregate!r}; allowed: {', '.join(AGGREGATES)}")
    masked = masked_losses.double()
    central = torch.quantile(masked, 0.5, dim=0) if aggregate == "median" else masked.mean(dim=0)
    return (central - intact_losses.double().mean()).float()


def subset_mean_losses(calib: CalibrationSet, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-item loss sums (N,) and target counts (N,) -> (K,) token-level subset means."""
    subset = torch.tensor([it.subset for it in calib.items])
    k = calib.config.n_subsets
    total = torch.zeros(k, dtype=torch.float64).index_add_(0, subset, sums.double().cpu())
    n = torch.zeros(k, dtype=torch.float64).index_add_(0, subset, counts.double().cpu())
    return total / n


@torch.inference_mode()
def item_loss_sums(model: nn.Module, calib: CalibrationSet, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward every calibration item; returns per-item target loss sums and counts, (N,) each."""
    n = len(calib.items)
    sums = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64)
    device = model_device(model)
    for batch in calib.batches(list(range(n)), batch_size, device):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        s, c = target_loss_sums(logits, batch.labels)
        idx = torch.tensor(batch.items)
        sums[idx], counts[idx] = s.cpu(), c.cpu()
    return sums, counts


def intact_subset_losses(model: nn.Module, calib: CalibrationSet, batch_size: int = 8) -> torch.Tensor:
    """(K,) mean target loss per subset of the unmasked model."""
    return subset_mean_losses(calib, *item_loss_sums(model, calib, batch_size))


def score_heads_reference(
    model: nn.Module, calib: CalibrationSet, *, aggregate: str = "median", batch_size: int = 8, progress: bool = True
) -> HeadScores:
    """Exact causal scores, the obvious way: one masked pass over the calibration set per head.

    Args:
        model: a supported causal LM (unchanged on return).
        calib: the calibration set with its K subsets.
        aggregate: ``median`` (paper) or ``mean``.
        batch_size: calibration items per forward.
        progress: show a progress bar over heads.

    Returns:
        :class:`HeadScores` with (L, H) scores.
    """
    layout = get_layout(model)
    intact = intact_subset_losses(model, calib, batch_size)
    masked = torch.zeros(calib.config.n_subsets, layout.num_layers, layout.num_heads, dtype=torch.float64)
    bar = tqdm(total=layout.num_layers * layout.num_heads, desc="scoring heads (reference)", disable=not progress)
    for layer in range(layout.num_layers):
        for head in range(layout.num_heads):
            mask = torch.ones(layout.num_heads)
            mask[head] = 0.0
            with mask_heads(model, {layer: mask}, layout):
                masked[:, layer, head] = subset_mean_losses(calib, *item_loss_sums(model, calib, batch_size))
            bar.update()
    bar.close()
    masked, intact = masked.float(), intact.float()  # stored precision, so cached == fresh
    return HeadScores(aggregate_scores(masked, intact, aggregate), masked, intact, aggregate)


def _score_payload(identity: dict, calib: CalibrationSet, method: str) -> dict:
    return {"model": identity, "calibration": calib.config.to_dict(), "style": calib.style,
            "method": method, "scoring_version": SCORING_VERSION}


def progress_dir(payload: dict, cache_dir=None):
    """Folder of the per-layer progress of an unfinished ``exact`` run (beside its cache entry)."""
    entry = cache.entry_dir("scores", payload, cache_dir)
    return entry.with_name(entry.name + ".progress")


def head_scores(
    lm, calib: CalibrationSet, *, method: str = "exact", aggregate: str = "median",
    batch_size: int = 8, memory_budget: int | None = None, use_cache: bool = True, force: bool = False,
    progress: bool = True, cache_dir=None,
) -> HeadScores:
    """Causal head scores of a loaded model, read from the score cache when present.

    The cache key holds the model identity (name and weight fingerprint), every calibration
    setting, the resolved prompt style, the method and :data:`SCORING_VERSION`. The per-subset
    losses are stored, so either aggregate is served from one entry. An ``exact`` run writes
    its progress per layer beside the entry (:func:`progress_dir`); a run stopped midway
    resumes there, and the progress is removed once the entry is written.

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
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate={aggregate!r}; allowed: {', '.join(AGGREGATES)}")
    payload = _score_payload(lm.identity(), calib, method)
    if use_cache and not force:
        hit = cache.load_entry("scores", payload, cache_dir)
        if hit is not None:
            settings, t = hit
            return HeadScores(aggregate_scores(t["masked_losses"], t["intact_losses"], aggregate),
                              t["masked_losses"], t["intact_losses"], aggregate, settings)
    checkpoints = progress_dir(payload, cache_dir) if use_cache else None
    if checkpoints is not None and force:
        shutil.rmtree(checkpoints, ignore_errors=True)
    if method == "exact":
        from cap_lab.fast_scoring import score_heads_fast

        result = score_heads_fast(lm.model, calib, aggregate=aggregate, batch_size=batch_size,
                                  memory_budget=memory_budget, checkpoint_dir=checkpoints, progress=progress)
    elif method == "attribution":
        from cap_lab.attribution import score_heads_attribution

        result = score_heads_attribution(lm.model, calib, aggregate=aggregate, batch_size=batch_size, progress=progress)
    else:
        result = score_heads_reference(lm.model, calib, aggregate=aggregate, batch_size=batch_size, progress=progress)
    settings = dict(result.settings, method=method, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    n_tokens=calib.n_tokens, n_target_tokens=calib.n_target_tokens)
    if use_cache:
        folder = cache.save_entry("scores", payload, settings,
                                  {"masked_losses": result.masked_losses, "intact_losses": result.intact_losses}, cache_dir)
        shutil.rmtree(checkpoints, ignore_errors=True)
        settings = dict(settings, payload=payload, key=folder.name, path=str(folder))
    return replace(result, settings=settings)
