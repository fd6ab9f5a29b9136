"""Evaluation results: the result object, confidence intervals, and saved runs.

Every evaluation returns an :class:`EvalResult`: the metric with its 95% confidence interval
(Wilson score interval for accuracies, :func:`wilson_interval`), n, the settings that
determined it, the model's identity (name + weight fingerprint) and its measured sparsity.

A run is saved as a :mod:`cap_lab.store` entry ``<out_dir>/<task>-<mode>-<key>/`` holding
``summary.json`` (the result and the settings payload), ``records.jsonl`` (one JSON object per
example or window) and the store's checksummed ``entry.json``. ``key`` is
:func:`cap_lab.store.entry_key` of the payload, which contains the model fingerprint, dtype, the
exact examples and every setting that changes the numbers, so a pruned model or a changed prompt
template gets a new folder. The folder is written atomically; :func:`cached_run` returns a saved
run with the same payload instead of recomputing (``force=True`` recomputes), and a damaged
saved run (an emptied ``records.jsonl``, an edited summary) is reported in one warning line and
recomputed. Without ``out_dir`` runs go to ``<cache_root>/eval``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

from cap_lab import store
from cap_lab.models import cache_root, model_fingerprint

#: bump when a change to this package changes evaluation numbers (part of every run key)
EVAL_VERSION = "1"
Z_95 = 1.959963984540054


@dataclass(frozen=True)
class EvalResult:
    """One task's evaluation of one model.

    Attributes:
        task: ``gsm8k``, ``strategyqa``, ``arc_challenge`` or ``wikitext2``.
        mode: ``cot``, ``loglik`` or ``perplexity``.
        metric: name of ``value``: ``strict_accuracy``, ``loglik_accuracy`` or ``perplexity``.
        value: the metric (accuracies in [0, 1]).
        ci_low, ci_high: its 95% confidence interval (``None`` where undefined).
        n: examples (windows for perplexity).
        settings: everything that determined the result (the run key's payload).
        model: model identity, ``{"name", "fingerprint"}``.
        sparsity: measured fraction of zero weights in the prunable matrices (``None`` if the
            architecture is not one :mod:`cap_lab.modeling` knows).
        strict_accuracy, flexible_accuracy: CoT only; the paper's metric is the strict one.
        chain_stats: CoT only; :func:`cap_lab.evaluation.chains.summarize_chains`.
        details: metric-specific extras (intervals of secondary metrics, token counts, timing).
        path: the saved run folder, if saved.
        cached: whether this result was read from a saved run.
    """

    task: str
    mode: str
    metric: str
    value: float
    ci_low: float | None
    ci_high: float | None
    n: int
    settings: dict
    model: dict
    sparsity: float | None
    strict_accuracy: float | None = None
    flexible_accuracy: float | None = None
    chain_stats: dict | None = None
    details: dict = field(default_factory=dict)
    path: str | None = None
    cached: bool = False

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EvalResult":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def outcomes(self) -> dict[str, float]:
        """Each example's outcome by example id, for paired comparisons (:mod:`cap_lab.stats`).

        1 or 0 for correct or not (CoT: the strict answer), or, for perplexity, each window's
        mean NLL in nats per token (keyed by the window's index).
        """
        records = read_records(self)
        if self.mode == "perplexity":
            return {str(r["window"]): float(r["mean_nll"]) for r in records}
        key = "strict_correct" if self.mode == "cot" else "correct"
        return {str(r["uid"]): int(bool(r[key])) for r in records}


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); ``(0, 1)`` for n = 0."""
    if n == 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} outside [0, n={n}]")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def describe_model(lm) -> dict:
    """Identity, dtype, device and measured sparsity of a loaded model.

    The fingerprint is recomputed from the current weights (not the value cached on ``lm``),
    so a model pruned in place after loading is never mistaken for its dense self.
    """
    from cap_lab.saving import read_prune_info

    params = next(lm.model.parameters())
    info = {
        "identity": {"name": lm.name, "fingerprint": model_fingerprint(lm.model)},
        "dtype": str(params.dtype).replace("torch.", ""),
        "device_type": params.device.type,
        "sparsity": None,
        "prune_info": None,
    }
    try:
        from cap_lab.pruning import sparsity_report

        report = sparsity_report(lm.model)
        info["sparsity"] = float(report["zeros"].sum() / report["numel"].sum())
    except ValueError:  # an architecture the adapter does not know
        pass
    prune = read_prune_info(lm.source) if lm.source and Path(lm.source).is_dir() else None
    if prune:
        info["prune_info"] = {k: prune.get(k) for k in ("method", "target_sparsity", "achieved_sparsity", "source_model")}
    return info


def _root(out_dir) -> Path:
    return Path(out_dir).expanduser() if out_dir is not None else cache_root() / "eval"


def _prefix(payload: dict) -> str:
    return f"{payload['task']}-{payload['mode']}-"


def run_folder(payload: dict, out_dir: str | os.PathLike | None = None) -> Path:
    """``<out_dir>/<task>-<mode>-<key>`` of a run payload (default ``out_dir``: the cache)."""
    return store.entry_folder(_root(out_dir), payload, _prefix(payload))


def load_run(payload: dict, out_dir=None) -> EvalResult | None:
    """The saved result with exactly this payload, or ``None`` (absent, or damaged: one warning)."""
    entry = store.load(_root(out_dir), payload, prefix=_prefix(payload))
    if entry is None:
        return None
    summary = json.loads((entry.folder / "summary.json").read_text(encoding="utf-8"))  # checksum verified
    return replace(EvalResult.from_dict(summary["result"]), path=str(entry.folder), cached=True)


def save_run(result: EvalResult, payload: dict, records: list[dict], out_dir=None) -> EvalResult:
    """Write ``summary.json`` and ``records.jsonl`` atomically; returns the result with ``path``."""
    folder = run_folder(payload, out_dir)
    result = replace(result, path=str(folder), cached=False)
    summary = {"result": result.to_dict(), "payload": payload, "key": store.entry_key(payload)}
    files = {"summary.json": json.dumps(summary, indent=2, sort_keys=True, default=str),
             "records.jsonl": "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)}
    store.save(_root(out_dir), payload, prefix=_prefix(payload), files=files)
    return result


def read_records(result: EvalResult) -> list[dict]:
    """The per-example records of a saved run."""
    if result.path is None:
        raise ValueError(f"the {result.task} result was not saved, so it has no records")
    with open(Path(result.path) / "records.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def cached_run(payload: dict, out_dir, force: bool, compute: Callable[[], tuple[EvalResult, list[dict]]]) -> EvalResult:
    """A saved run with this payload, else ``compute()`` saved (always recomputed if ``force``)."""
    if not force:
        saved = load_run(payload, out_dir)
        if saved is not None:
            return saved
    result, records = compute()
    return save_run(result, payload, records, out_dir)
