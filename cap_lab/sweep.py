"""The sparsity sweep behind Table 1 (paper Sec. 5) and Sec. 5.3, cached cell by cell.

For one model, a sweep visits the dense model and every (method, sparsity) of a profile
(:mod:`cap_lab.config`). Each cell

1. restores the dense weights from a CPU copy of the prunable matrices (:class:`DenseWeights`:
   pruning only ever zeroes decoder linear weights, so copying those back is exact),
2. prunes with :func:`cap_lab.pruning.prune_model` (CAP uses the cached head scores; Wanda and
   the head scores use the same calibration set),
3. records what pruning did (achieved sparsity, per layer, per matrix type, per head),
4. evaluates (:func:`cap_lab.evaluation.evaluate`): log-likelihood accuracy and CoT accuracy
   on the reasoning tasks and WikiText-2 perplexity, each with its confidence interval,
5. writes the record to the settings-keyed store (:mod:`cap_lab.store`, ``<results>/sweep``).

Every (task, mode) of a cell is also stored on its own as soon as it is evaluated
(``<results>/rows``), so a run stopped in the middle of a cell loses at most the task it was
on, and the next run goes on from there. ``<results>`` is :func:`results_root`: the machine's
cache, or, for a profile with a ``results_dir`` (``cpu-full``), a folder of the checkout whose
entries are committed, so a run of hours can be resumed on another machine.

A cell's key holds the dense model's identity (name and weight fingerprint), the calibration
settings, the scoring method, the pruning settings and the evaluation settings, so an
interrupted sweep resumes at the first missing cell, and notebooks 03, 04 and 05 read what an
earlier notebook computed. The pruning summary alone is also stored (``<results>/prune``) so the
explorer (notebook 05) can show any cell without pruning again.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from cap_lab import store
from cap_lab.modeling import get_layout
from cap_lab.calibration import CalibrationSet, build_calibration_set
from cap_lab.config import Profile, get_profile, load_profile_model, repo_root
from cap_lab.evaluation import LOGLIK_TASKS, evaluate
from cap_lab.models import LoadedModel, cache_root
from cap_lab.pruning import PruneConfig, attention_sparsity_per_head, prune_model, sparsity_by
from cap_lab.scoring import HeadScores, head_scores

SWEEP_VERSION = "1"
DENSE = "dense"


def results_root(profile: Profile) -> Path:
    """Where a profile's sweep entries live: ``<checkout>/<results_dir>`` if it has one, else the cache."""
    return repo_root() / profile.results_dir if profile.results_dir else cache_root()


# ------------------------------------------------------------------ dense weights
class DenseWeights:
    """A CPU copy of every prunable matrix of a model, to undo pruning exactly.

    Example:
        >>> dense = DenseWeights(lm.model)          # doctest: +SKIP
        >>> prune_model(lm.model, PruneConfig("cap", 0.2), head_scores=s)  # doctest: +SKIP
        >>> dense.restore(lm.model)                 # bit-for-bit the dense model again  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module):
        self._weights = [w.detach().to("cpu", copy=True) for _, _, w in self._modules(model)]

    @staticmethod
    def _modules(model: nn.Module) -> list[tuple[int, str, torch.Tensor]]:
        return [(l, n, m.weight) for l, n, m in get_layout(model).linear_weights(model)]

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Copy the dense weights back into ``model`` (the model it was taken from)."""
        modules = self._modules(model)
        assert len(modules) == len(self._weights), (len(modules), len(self._weights))
        for (_, _, w), saved in zip(modules, self._weights):
            w.copy_(saved.to(w.device))


# ------------------------------------------------------------------ cells
@dataclass(frozen=True)
class SweepCell:
    """One column of Table 1's rows: the dense model, or a method at a sparsity."""

    method: str
    sparsity: float

    @property
    def label(self) -> str:
        return "Dense" if self.method == DENSE else f"{self.method} {self.sparsity:.0%}"


def sweep_cells(profile: Profile) -> list[SweepCell]:
    """Dense first, then every method at every sparsity of the profile."""
    return [SweepCell(DENSE, 0.0)] + [SweepCell(m, float(s)) for s in profile.sparsities for m in profile.methods]


def prune_config(profile: Profile, method: str, sparsity: float) -> PruneConfig:
    return PruneConfig(method=method, sparsity=float(sparsity), magnitude_scope=profile.magnitude_scope)


@dataclass
class SweepContext:
    """What every cell of one model needs: the model, its dense weights, calibration and scores.

    Attributes:
        profile: the run profile.
        lm: the loaded model (pruned in place by a cell, restored after).
        dense: the CPU copy of its prunable weights.
        identity: the dense model's identity (name and fingerprint).
        calib: the calibration set of the profile.
        scores: CAP's head scores (``None`` until first needed).
        data_dir: benchmark data folder (``None``: ``$CAP_LAB_DATA``).
    """

    profile: Profile
    lm: LoadedModel
    dense: DenseWeights
    identity: dict
    calib: CalibrationSet
    data_dir: object = None
    scores: HeadScores | None = None
    timings: dict = field(default_factory=dict)

    def head_scores(self, progress: bool = False) -> HeadScores:
        if self.scores is None:
            self.dense.restore(self.lm.model)
            self.scores = head_scores(self.lm, self.calib, method=self.profile.score_method,
                                      batch_size=self.profile.score_batch_size, progress=progress)
        return self.scores

    def base_payload(self) -> dict:
        return {"model": self.identity, "calibration": self.calib.config.to_dict(), "style": self.calib.style,
                "score_method": self.profile.score_method, "sweep_version": SWEEP_VERSION}


def open_model(profile: Profile | str | None, model: str | LoadedModel | None = None, *, data_dir=None) -> SweepContext:
    """Load a model of the profile (the first by default) with its calibration set.

    Args:
        profile: a :class:`Profile` or its name (``None``: ``$CAP_LAB_PROFILE``).
        model: a name from the profile (or any loadable name), or an already loaded model.
        data_dir: benchmark data folder.
    """
    profile = get_profile(profile)
    lm = model if isinstance(model, LoadedModel) else load_profile_model(model or profile.models[0])
    calib = build_calibration_set(lm.tokenizer, profile.calibration, data_dir)
    return SweepContext(profile, lm, DenseWeights(lm.model), lm.identity(), calib, data_dir)


# ------------------------------------------------------------------ pruning summary
def _prune_payload(ctx: SweepContext, cell: SweepCell) -> dict:
    cfg = prune_config(ctx.profile, cell.method, cell.sparsity) if cell.method != DENSE else None
    return dict(ctx.base_payload(), prune=None if cfg is None else {k: v for k, v in vars(cfg).items()})


def pruning_summary(model: nn.Module, report: pd.DataFrame) -> dict:
    """What pruning left: ``achieved_sparsity``, ``by_layer``, ``by_matrix`` and ``head_sparsity``
    of ``model`` (``report``: its :func:`cap_lab.pruning.sparsity_report`)."""
    by_layer, by_matrix = sparsity_by(report, "layer"), sparsity_by(report, "matrix")
    return {"achieved_sparsity": float(report["zeros"].sum() / report["numel"].sum()),
            "by_layer": [float(x) for x in by_layer["sparsity"]],
            "by_matrix": {str(k): float(v) for k, v in zip(by_matrix["matrix"], by_matrix["sparsity"])},
            "head_sparsity": attention_sparsity_per_head(model).tolist()}


def prune_cell(ctx: SweepContext, cell: SweepCell, progress: bool = False) -> dict:
    """Restore the dense weights, prune ``cell`` in place and summarise what was removed.

    Returns:
        ``achieved_sparsity``, ``by_layer`` (per-layer sparsity list), ``by_matrix``
        ({q, k, v, o, gate, up, down: sparsity}) and ``head_sparsity`` ((L, H) nested list:
        fraction of each query head's q rows and o columns that are zero). The summary is
        also written to the ``prune`` cache.
    """
    ctx.dense.restore(ctx.lm.model)
    start = time.perf_counter()
    if cell.method != DENSE:
        scores = ctx.head_scores(progress).scores if cell.method == "cap" else None
        result = prune_model(ctx.lm.model, prune_config(ctx.profile, cell.method, cell.sparsity), head_scores=scores,
                             calib=ctx.calib, batch_size=ctx.profile.score_batch_size, progress=progress)
        report = result.report
    else:
        from cap_lab.pruning import sparsity_report

        report = sparsity_report(ctx.lm.model)
    summary = dict(pruning_summary(ctx.lm.model, report), prune_seconds=time.perf_counter() - start)
    store.save(results_root(ctx.profile) / "prune", _prune_payload(ctx, cell), {"summary": summary})
    return summary


def cached_prune_summary(ctx: SweepContext, cell: SweepCell) -> dict | None:
    """The cached pruning summary of ``cell``, or ``None``."""
    hit = store.load(results_root(ctx.profile) / "prune", _prune_payload(ctx, cell))
    return None if hit is None else hit.metadata["summary"]


def prune_summary(ctx: SweepContext, cell: SweepCell, progress: bool = False) -> dict:
    """Cached pruning summary; prunes (and restores the dense weights) when missing."""
    summary = cached_prune_summary(ctx, cell)
    if summary is None:
        summary = prune_cell(ctx, cell, progress)
        ctx.dense.restore(ctx.lm.model)
    return summary


# ------------------------------------------------------------------ evaluation
def _rows(results: dict, mode: str) -> list[dict]:
    nan = float("nan")
    rows = []
    for task, r in results.items():
        low, high = r.ci_low, r.ci_high
        rows.append({"task": task, "mode": mode, "metric": r.metric, "value": float(r.value),
                     "ci_low": nan if low is None else float(low), "ci_high": nan if high is None else float(high),
                     "n": int(r.n or 0), "outcomes": r.outcomes()})
    return rows


def evaluate_settings(profile: Profile) -> dict:
    return profile.eval.to_dict()


def loglik_tasks(tasks) -> list[str]:
    """The tasks that have option log-likelihood accuracy (multiple choice / yes-no)."""
    return [t for t in tasks if t in LOGLIK_TASKS]


def evaluate_model(lm: LoadedModel, profile: Profile, *, data_dir=None, progress: bool = False,
                   loglik: tuple[str, ...] | None = None, cot: tuple[str, ...] | None = None, ppl: bool = True) -> list[dict]:
    """Evaluate the current weights of ``lm`` with the profile's evaluation settings.

    Args:
        lm: the model (dense or pruned in place).
        profile: evaluation sizes (``profile.eval``).
        data_dir: benchmark data folder.
        progress: progress bars.
        loglik: tasks for log-likelihood accuracy (default: the profile's tasks that have it).
        cot: tasks for chain-of-thought accuracy (default: the profile's ``cot_tasks`` if
            ``cot_limit`` > 0).
        ppl: also WikiText-2 perplexity.

    Returns:
        Rows ``{task, mode, metric, value, ci_low, ci_high, n, outcomes}``: ``mode`` is
        ``loglik`` (accuracy of the likeliest option), ``cot`` (greedy chain-of-thought
        accuracy, strict) or ``ppl`` (WikiText-2 perplexity); a missing interval is NaN;
        ``outcomes`` maps each example (window) to its outcome (:meth:`EvalResult.outcomes`),
        for paired comparisons between cells.
    """
    plan = profile.eval
    loglik = list(loglik if loglik is not None else loglik_tasks(plan.tasks))
    cot = list(cot if cot is not None else (plan.cot_tasks if plan.cot_limit else ()))
    rows: list[dict] = []
    if loglik:
        rows += _rows(evaluate(lm, loglik, plan.loglik_settings(), data_dir=data_dir, progress=progress), "loglik")
    if cot:
        rows += _rows(evaluate(lm, cot, plan.cot_settings(), data_dir=data_dir, progress=progress), "cot")
    if ppl:
        rows += _rows(evaluate(lm, ["wikitext2"], plan.perplexity_settings(), data_dir=data_dir, progress=progress),
                      "ppl")
    return rows


# ------------------------------------------------------------------ one cell, one model
CELL_VERSION = "3"  # 2: rows carry per-example outcomes; 3: each task is stored as it finishes


def _cell_payload(ctx: SweepContext, cell: SweepCell) -> dict:
    return dict(_prune_payload(ctx, cell), eval=evaluate_settings(ctx.profile), cell_version=CELL_VERSION)


def evaluation_units(profile: Profile) -> list[tuple[str, str]]:
    """The ``(mode, task)`` evaluations of every cell, in the order they run."""
    plan = profile.eval
    units = [("loglik", t) for t in loglik_tasks(plan.tasks)]
    units += [("cot", t) for t in (plan.cot_tasks if plan.cot_limit else ())]
    return units + [("ppl", "wikitext2")]


def _evaluate_unit(ctx: SweepContext, mode: str, task: str, progress: bool) -> dict:
    start = time.perf_counter()
    (row,) = evaluate_model(ctx.lm, ctx.profile, data_dir=ctx.data_dir, progress=progress,
                            loglik=(task,) if mode == "loglik" else (), cot=(task,) if mode == "cot" else (),
                            ppl=mode == "ppl")
    return dict(row, seconds=time.perf_counter() - start)


def run_cell(ctx: SweepContext, cell: SweepCell, *, force: bool = False, progress: bool = False) -> dict:
    """Prune, evaluate and store one cell (or read it, or the tasks already done, from the store).

    Returns:
        The record: ``model``, ``method``, ``sparsity``, the pruning summary, ``rows`` (see
        :func:`evaluate_model`; each with the ``seconds`` it took) and ``seconds`` (this
        call's wall time). The model holds the dense weights again on return, also after an
        error or an interruption.
    """
    root = results_root(ctx.profile)
    payload = _cell_payload(ctx, cell)
    if not force:
        hit = store.load(root / "sweep", payload)
        if hit is not None:
            return hit.metadata["record"]
    start = time.perf_counter()
    summary, rows = None, []
    try:
        for mode, task in evaluation_units(ctx.profile):
            unit = dict(payload, mode=mode, task=task)
            hit = None if force else store.load(root / "rows", unit)
            if hit is not None:
                rows.append(hit.metadata["row"])
                continue
            if summary is None:  # prune only when some task still needs the pruned model
                summary = prune_cell(ctx, cell, progress)
            rows.append(_evaluate_unit(ctx, mode, task, progress))
            store.save(root / "rows", unit, {"row": rows[-1]})
    finally:
        ctx.dense.restore(ctx.lm.model)
    if summary is None:
        summary = prune_summary(ctx, cell, progress)
    record = {"model": ctx.identity["name"], "method": cell.method, "sparsity": cell.sparsity, **summary,
              "rows": rows, "seconds": time.perf_counter() - start,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    store.save(root / "sweep", payload, {"record": record})
    return record


def run_sweep(profile: Profile | str | None = None, model: str | LoadedModel | None = None, *, data_dir=None,
              force: bool = False, progress: bool = True, cells: list[SweepCell] | None = None) -> "SweepResult":
    """Every cell of the profile for one model; finished cells come from the cache.

    Args:
        profile: profile or its name.
        model: which model (default: the profile's first).
        data_dir: benchmark data folder.
        force: recompute cached cells.
        progress: print one line per cell.
        cells: a subset of :func:`sweep_cells` (default: all).
    """
    ctx = open_model(profile, model, data_dir=data_dir)
    records = []
    for cell in cells if cells is not None else sweep_cells(ctx.profile):
        start = time.perf_counter()
        records.append(run_cell(ctx, cell, force=force, progress=False))
        if progress:
            print(f"{ctx.identity['name']}: {cell.label:>14} done in {time.perf_counter() - start:6.1f} s", flush=True)
    return SweepResult(ctx.profile, records)


# ------------------------------------------------------------------ results as tables
@dataclass(frozen=True)
class SweepResult:
    """The records of a sweep, with tidy views of them."""

    profile: Profile
    records: list[dict]

    def results(self) -> pd.DataFrame:
        """One row per (model, method, sparsity, task, mode), with value and CI."""
        rows = [dict(model=r["model"], method=r["method"], sparsity=r["sparsity"], achieved_sparsity=r["achieved_sparsity"], **row)
                for r in self.records for row in r["rows"]]
        return pd.DataFrame(rows, columns=RESULT_COLUMNS)

    def layer_sparsity(self) -> pd.DataFrame:
        """One row per (model, method, sparsity, layer)."""
        rows = [dict(model=r["model"], method=r["method"], sparsity=r["sparsity"], layer=i, layer_sparsity=s)
                for r in self.records for i, s in enumerate(r["by_layer"])]
        return pd.DataFrame(rows)

    def wall_times(self) -> pd.DataFrame:
        """Seconds each stage of each cell took when it ran (stored with it, so also for a
        resumed run): one row per (model, method, sparsity, stage), ``stage`` being ``prune``
        (not for dense) or ``<mode> <task>``; NaN where a stored record has no time."""
        rows = []
        for r in self.records:
            key = dict(model=r["model"], method=r["method"], sparsity=r["sparsity"])
            if r["method"] != DENSE:
                rows.append(dict(key, stage="prune", seconds=float(r.get("prune_seconds", float("nan")))))
            rows += [dict(key, stage=f"{row['mode']} {row['task']}", seconds=float(row.get("seconds", float("nan"))))
                     for row in r["rows"]]
        return pd.DataFrame(rows, columns=["model", "method", "sparsity", "stage", "seconds"])

    def __add__(self, other: "SweepResult") -> "SweepResult":
        return SweepResult(self.profile, self.records + other.records)


RESULT_COLUMNS = ["model", "method", "sparsity", "achieved_sparsity", "task", "mode", "metric", "value", "ci_low", "ci_high", "n"]
