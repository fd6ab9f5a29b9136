"""The paper's Sec. 6 ablations and the methods beyond it, on one grid (notebook 06).

The paper reports its ablations only qualitatively and names its own gaps (no SparseGPT, no
MLP-neuron attribution; its Sec. 7). Every variant here is a row of :data:`VARIANTS`: a pruning
method with :class:`cap_lab.pruning.PruneConfig` overrides, and, for CAP, the calibration and
aggregation its head scores come from:

==================  =========================================================================
``magnitude``       ``|W|`` (the profile's scope), the paper's simplest baseline
``wanda``           ``|W| * ||X||`` per output row (Sun et al., 2024), the paper's baseline
``sparsegpt``       OBS weight reconstruction (Frantar & Alistarh, 2023), beyond the paper
``cap``             the paper's CAP (Sec. 3)
``cap-neuron``      MLP weights get per-neuron factors from MLP-neuron attribution
                    (:mod:`cap_lab.scoring.neurons`) instead of the layer mean, beyond the paper
``cap-activation``  ``|W| * ||X|| * I``: Wanda's statistic times CAP's factor, beyond the paper
``cap-layer``       CAP's score with one threshold per layer instead of one global, beyond
``cap-row``         CAP's score pruned per output row (Wanda's comparison group), beyond
``cap-activation-row``  ``|W| * ||X|| * I`` per output row: Wanda's rule on the dense model's
                    norms times CAP's factor, which separates what the factor does from what
                    the budget allocation does, beyond the paper
``cap-heads``       whole heads removed by causal score (Sec. 6, "weight-level vs head-level")
``cap-wikitext2``   head scores calibrated on WikiText-2 windows (Sec. 6, "reasoning-focused
                    calibration")
``cap-mean``        mean instead of median over the K subsets (Sec. 6, Eq. 2)
``cap-k2/-k5``      K = 2 or 5 subsets (Sec. 6, "number of calibration subsamples"; ``cap`` is
                    the profile's K, 3)
==================  =========================================================================

Each is run at the profile's ``ablation_sparsities`` (unstructured) and its N:M patterns
(``ablation_nm``; not the per-layer, per-row and head-level rows, whose budgets an N:M pattern
replaces),
and evaluated like Table 1 but without chain-of-thought: option log-likelihood accuracy on the
profile's tasks and WikiText-2 perplexity, with per-example outcomes for paired comparisons
(:func:`cap_lab.tables.paired_differences` with :func:`comparisons`). Cells are stored in the
settings-keyed store (:func:`ablation_root`: the profile's committed ``ablation_results_dir``,
else beside the sweep's cells), so an interrupted grid resumes at the first missing cell, on
this machine or, once the entries are committed, another; head and neuron scores come from
their caches. A record's ``method`` is the variant's name, with `` 2:4`` for an N:M cell.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import torch

from cap_lab import store
from cap_lab.calibration import CalibrationSet, build_calibration_set
from cap_lab.config import Profile, repo_root
from cap_lab.pruning import PruneConfig, prune_model, sparsity_report
from cap_lab.scoring import head_scores
from cap_lab.scoring.neurons import score_neurons_attribution
from cap_lab.sweep import (
    DENSE, SweepContext, SweepResult, evaluate_model, open_model, prune_config, pruning_summary, results_root,
)

ABLATION_VERSION = "1"


def ablation_root(profile: Profile):
    """Folder of a profile's ablation cells (``<checkout>/<ablation_results_dir>`` or ``<results>/ablations``)."""
    if profile.ablation_results_dir:
        return repo_root() / profile.ablation_results_dir
    return results_root(profile) / "ablations"


@dataclass(frozen=True)
class Variant:
    """One row of the ablation grid.

    Attributes:
        name: the row's name (``cap-neuron``).
        method: :class:`PruneConfig` method.
        prune: other :class:`PruneConfig` fields, as ``(name, value)`` pairs.
        calibration: :class:`CalibrationConfig` fields of the head scores' calibration set.
        aggregate: ``median`` or ``mean`` over the K subsets (head scores).
        origin: where the method comes from.
    """

    name: str
    method: str
    prune: tuple[tuple[str, object], ...] = ()
    calibration: tuple[tuple[str, object], ...] = ()
    aggregate: str = "median"
    origin: str = ""

    @property
    def uses_head_scores(self) -> bool:
        return self.method in ("cap", "cap_heads")

    @property
    def allows_nm(self) -> bool:
        return self.method != "cap_heads" and dict(self.prune).get("cap_scope", "global") == "global"


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("magnitude", "magnitude", origin="magnitude pruning (the paper's Sec. 4 baseline)"),
    Variant("wanda", "wanda", origin="Wanda (Sun et al., 2024): the paper's baseline"),
    Variant("sparsegpt", "sparsegpt", origin="SparseGPT (Frantar & Alistarh, 2023): beyond the paper"),
    Variant("cap", "cap", origin="CAP (the paper, Sec. 3)"),
    Variant("cap-neuron", "cap", prune=(("cap_mlp_factors", "neuron"),), origin="MLP-neuron attribution: beyond the paper (its Sec. 7)"),
    Variant("cap-activation", "cap", prune=(("cap_activation", True),), origin="|W| ||X|| I: beyond the paper"),
    Variant("cap-layer", "cap", prune=(("cap_scope", "layer"),), origin="per-layer budget: beyond the paper"),
    Variant("cap-row", "cap", prune=(("cap_scope", "row"),), origin="per-row budget: beyond the paper"),
    Variant("cap-activation-row", "cap", prune=(("cap_activation", True), ("cap_scope", "row")),
            origin="|W| ||X|| I per row: beyond the paper"),
    Variant("cap-heads", "cap_heads", origin="head-level pruning (Sec. 6)"),
    Variant("cap-wikitext2", "cap", calibration=(("source", "wikitext2"),), origin="WikiText-2 calibration (Sec. 6)"),
    Variant("cap-mean", "cap", aggregate="mean", origin="mean over subsets (Sec. 6)"),
    Variant("cap-k2", "cap", calibration=(("n_subsets", 2),), origin="K = 2 (Sec. 6)"),
    Variant("cap-k5", "cap", calibration=(("n_subsets", 5),), origin="K = 5 (Sec. 6)"),
)}


def get_variants(names) -> list[Variant]:
    """The variants called ``names`` (``ValueError`` naming unknown ones and the allowed)."""
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        raise ValueError(f"unknown ablation variants {bad!r}; allowed: {', '.join(VARIANTS)}")
    return [VARIANTS[n] for n in names]


@dataclass(frozen=True)
class AblationCell:
    """A variant at an unstructured sparsity (``nm`` None) or an N:M pattern."""

    variant: str
    sparsity: float
    nm: tuple[int, int] | None = None

    @property
    def method(self) -> str:
        """The record's ``method``: the variant, with `` N:M`` for a semi-structured cell."""
        return self.variant if self.nm is None else f"{self.variant} {self.nm[0]}:{self.nm[1]}"


def ablation_cells(profile: Profile) -> list[AblationCell]:
    """Dense first, then every variant of the profile at every sparsity and N:M pattern it allows."""
    cells = [AblationCell(DENSE, 0.0)]
    for v in get_variants(profile.ablation_variants):
        cells += [AblationCell(v.name, float(s)) for s in profile.ablation_sparsities]
        cells += [AblationCell(v.name, (m - n) / m, (n, m)) for n, m in profile.ablation_nm if v.allows_nm]
    return cells


def comparisons(cells: list[AblationCell]) -> list[tuple[str, str]]:
    """Each variant against Wanda at the same pattern and against dense (for paired tables)."""
    out = []
    for c in cells:
        if c.variant == DENSE:
            continue
        wanda = AblationCell("wanda", c.sparsity, c.nm).method
        pairs = [(c.method, wanda)] if c.variant != "wanda" else []
        out += [p for p in pairs + [(c.method, DENSE)] if p not in out]
    return out


def prune_settings(profile: Profile, cell: AblationCell) -> PruneConfig:
    """The :class:`PruneConfig` of a non-dense cell."""
    v = VARIANTS[cell.variant]
    base = prune_config(profile, v.method, cell.sparsity)
    return replace(base, sparsity=None if cell.nm else cell.sparsity, nm=cell.nm, **dict(v.prune))


class AblationRunner:
    """Prunes and evaluates ablation cells of one model (scores computed once, cells stored)."""

    def __init__(self, ctx: SweepContext):
        self.ctx = ctx
        self._calibs: dict[tuple, CalibrationSet] = {}

    def _calibration(self, overrides: tuple) -> CalibrationSet:
        if overrides not in self._calibs:
            cfg = replace(self.ctx.calib.config, **dict(overrides))
            self._calibs[overrides] = (self.ctx.calib if cfg == self.ctx.calib.config
                                       else build_calibration_set(self.ctx.lm.tokenizer, cfg, self.ctx.data_dir))
        return self._calibs[overrides]

    def head_scores(self, v: Variant) -> torch.Tensor:
        """(L, H) head scores of the variant's calibration and aggregate (cached)."""
        hs = head_scores(self.ctx.lm, self._calibration(v.calibration), method=self.ctx.profile.score_method,
                         batch_size=self.ctx.profile.score_batch_size, progress=False)
        return hs.with_aggregate(v.aggregate).scores

    def neuron_scores(self) -> torch.Tensor:
        """(L, I) MLP-neuron attribution scores on the profile's calibration set (stored)."""
        payload = dict(self.ctx.base_payload(), kind="neuron_scores", tokens_sha256=self.ctx.calib.token_digest(),
                       ablation_version=ABLATION_VERSION)
        root = results_root(self.ctx.profile) / "neuron_scores"
        hit = store.load(root, payload, shapes={"scores": None})
        if hit is not None:
            return hit.tensors["scores"]
        scores = score_neurons_attribution(self.ctx.lm.model, self.ctx.calib, batch_size=self.ctx.profile.score_batch_size,
                                           progress=False).scores
        store.save(root, payload, {}, tensors={"scores": scores.contiguous()})
        return scores

    def payload(self, cell: AblationCell) -> dict:
        spec = None if cell.variant == DENSE else dict(VARIANTS[cell.variant].__dict__, prune=vars(prune_settings(self.ctx.profile, cell)))
        return dict(self.ctx.base_payload(), variant=spec, cell=vars(cell), ablation_version=ABLATION_VERSION,
                    eval=dict(self.ctx.profile.eval.to_dict(), cot=False))

    def run(self, cell: AblationCell, *, force: bool = False) -> dict:
        """Prune ``cell``, evaluate it, store and return its record; the model is dense again after."""
        root = ablation_root(self.ctx.profile)
        payload = self.payload(cell)
        hit = None if force else store.load(root, payload)
        if hit is not None:
            return hit.metadata["record"]
        ctx, start = self.ctx, time.perf_counter()
        ctx.dense.restore(ctx.lm.model)
        try:
            if cell.variant != DENSE:
                v = VARIANTS[cell.variant]
                cfg = prune_settings(ctx.profile, cell)
                prune_model(ctx.lm.model, cfg, head_scores=self.head_scores(v) if v.uses_head_scores else None,
                            neuron_scores=self.neuron_scores() if cfg.cap_mlp_factors == "neuron" else None,
                            calib=ctx.calib, batch_size=ctx.profile.score_batch_size, progress=False)
            prune_seconds = time.perf_counter() - start
            summary = pruning_summary(ctx.lm.model, sparsity_report(ctx.lm.model))
            rows = evaluate_model(ctx.lm, ctx.profile, data_dir=ctx.data_dir, cot=())
            record = {"model": ctx.identity["name"], "method": cell.method, "variant": cell.variant,
                      "sparsity": cell.sparsity, "nm": list(cell.nm) if cell.nm else None, **summary,
                      "rows": rows, "prune_seconds": prune_seconds, "seconds": time.perf_counter() - start,
                      "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        finally:
            ctx.dense.restore(ctx.lm.model)
        store.save(root, payload, {"record": record})
        return record


def run_ablations(profile: Profile | str | None = None, model=None, *, data_dir=None, cells: list[AblationCell] | None = None,
                  force: bool = False, progress: bool = True) -> SweepResult:
    """Every ablation cell of the profile for one model (stored cells are read, not rerun).

    Args:
        profile: profile or its name (``ablation_variants``, ``ablation_sparsities``, ``ablation_nm``).
        model: a model name of the profile (default its first) or a loaded model.
        data_dir: benchmark data folder.
        cells: a subset of :func:`ablation_cells` (default all).
        force: recompute stored cells.
        progress: one line per cell.

    Returns:
        A :class:`cap_lab.sweep.SweepResult` of the records (its ``results()`` and
        ``layer_sparsity()`` views work as for the sweep).
    """
    ctx = open_model(profile, model, data_dir=data_dir)
    runner = AblationRunner(ctx)
    records = []
    for cell in cells if cells is not None else ablation_cells(ctx.profile):
        start = time.perf_counter()
        records.append(runner.run(cell, force=force))
        if progress:
            print(f"{ctx.identity['name']}: {cell.method:>20} {cell.sparsity:4.0%} done in "
                  f"{time.perf_counter() - start:6.1f} s", flush=True)
    return SweepResult(ctx.profile, records)


def collapse_answer(results, paired, *, baseline: str = "wanda", ratio_limit: float = 1.5):
    """Per unstructured variant: does it keep the top sparsity's perplexity near ``baseline``'s
    while staying at least level with it at the lower sparsities?

    "Level" means no paired difference against ``baseline`` at a lower sparsity is significantly
    worse (its 95% interval entirely below 0 for accuracy, entirely above 0 for WikiText-2 NLL).

    Args:
        results: :meth:`SweepResult.results` of an ablation grid (one model).
        paired: :func:`cap_lab.tables.paired_differences` of it, with :func:`comparisons`.
        baseline: the reference method.
        ratio_limit: the allowed perplexity ratio at the top sparsity.

    Returns:
        One row per variant: ``ppl_top``, ``baseline_ppl_top``, ``ratio``, ``worse_at_low``
        (the significantly worse ``task@sparsity`` entries), ``keeps_top``, ``level_at_low``
        and ``answers`` (both).
    """
    import pandas as pd

    unstructured = results[~results["method"].str.contains(" ") & (results["method"] != DENSE)]
    top = unstructured["sparsity"].max()
    ppl = unstructured[(unstructured["mode"] == "ppl") & (unstructured["sparsity"] == top)].set_index("method")["value"]
    rows = []
    for variant in dict.fromkeys(unstructured["method"]):
        if variant == baseline:
            continue
        low = paired[(paired["a"] == variant) & (paired["b"] == baseline) & (paired["sparsity"] < top)]
        worse = low[((low["mode"] != "ppl") & (low["ci_high"] < 0)) | ((low["mode"] == "ppl") & (low["ci_low"] > 0))]
        ratio = float(ppl.get(variant, float("nan")) / ppl.get(baseline, float("nan")))
        rows.append(dict(variant=variant, sparsity_top=float(top), ppl_top=float(ppl.get(variant, float("nan"))),
                         baseline_ppl_top=float(ppl.get(baseline, float("nan"))), ratio=ratio,
                         worse_at_low=", ".join(f"{t}@{s:.0%}" for t, s in zip(worse["task"], worse["sparsity"])),
                         keeps_top=bool(ratio <= ratio_limit), level_at_low=worse.empty,
                         answers=bool(ratio <= ratio_limit and worse.empty)))
    return pd.DataFrame(rows)
