"""One call that fills a row of the paper's Table 1: :func:`evaluate`.

``evaluate(lm, ["gsm8k", "strategyqa", "arc_challenge", "wikitext2"])`` runs chain-of-thought
accuracy on the three reasoning tasks (``EvalSettings(mode="loglik")``: option log-likelihood
accuracy on StrategyQA and ARC-Challenge instead) and WikiText-2 perplexity, measuring the model's identity
and sparsity once, and returns ``{task: EvalResult}``. Every task's run is saved and reused
(:mod:`cap_lab.evaluation.results`). :func:`results_table` formats results for printing.
"""
from __future__ import annotations

import os

import pandas as pd

from cap_lab.data import TASKS
from cap_lab.evaluation.cot import cot_accuracy
from cap_lab.evaluation.loglik import LOGLIK_TASKS, loglik_accuracy
from cap_lab.evaluation.perplexity import PERPLEXITY_TASK, wikitext2_perplexity
from cap_lab.evaluation.results import EvalResult, describe_model
from cap_lab.evaluation.settings import MODES, EvalSettings

EVAL_TASKS = TASKS + (PERPLEXITY_TASK,)


def parse_tasks(tasks: str | list[str] | tuple[str, ...], mode: str = "cot") -> tuple[str, ...]:
    """Validate a task list (or a comma-separated string) for ``mode``."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}")
    names = tuple(t.strip() for t in tasks.split(",")) if isinstance(tasks, str) else tuple(tasks)
    names = tuple(t for t in names if t)
    if not names:
        raise ValueError(f"no tasks given; allowed: {', '.join(EVAL_TASKS)}")
    allowed = (LOGLIK_TASKS if mode == "loglik" else TASKS) + (PERPLEXITY_TASK,)
    bad = [t for t in names if t not in allowed]
    if bad:
        raise ValueError(f"task(s) {', '.join(map(repr, bad))} not available with mode={mode!r}; allowed: {', '.join(allowed)}")
    return tuple(dict.fromkeys(names))


def evaluate(lm, tasks: str | list[str] | tuple[str, ...] = EVAL_TASKS, settings: EvalSettings = EvalSettings(), *,
             data_dir=None, out_dir: str | os.PathLike | None = None, force: bool = False,
             progress: bool = True) -> dict[str, EvalResult]:
    """Evaluate a loaded model on several tasks.

    Args:
        lm: a :class:`cap_lab.models.LoadedModel` (dense, or a pruned checkpoint loaded from
            its folder).
        tasks: names from :data:`EVAL_TASKS` (or a comma-separated string); ``wikitext2``
            gives perplexity.
        settings: how to evaluate (:class:`EvalSettings`: ``mode`` ``cot`` or ``loglik`` for
            the reasoning tasks, subset size and seed, generation cap, perplexity windows).
        data_dir: data folder (default ``$CAP_LAB_DATA``, else the hub).
        out_dir: folder for the saved runs (default: the cap_lab cache).
        force: recompute even where a run with the same settings is saved.
        progress: progress bars.

    Returns:
        ``{task: EvalResult}`` in the order of ``tasks``.

    Example::

        lm = load_model("smollm2-135m-instruct")
        results = evaluate(lm, "gsm8k,wikitext2", EvalSettings(limit=20, ppl_windows=4), out_dir="runs/dense")
        print(results_table(results))
    """
    names = parse_tasks(tasks, settings.mode)
    common = dict(data_dir=data_dir, out_dir=out_dir, force=force, progress=progress, model_info=describe_model(lm))
    results = {}
    for task in names:
        if task == PERPLEXITY_TASK:
            results[task] = wikitext2_perplexity(lm, settings, **common)
        elif settings.mode == "cot":
            results[task] = cot_accuracy(lm, task, settings, **common)
        else:
            results[task] = loglik_accuracy(lm, task, settings, **common)
    return results


def results_table(results: dict[str, EvalResult] | list[EvalResult]) -> pd.DataFrame:
    """One row per result: value with its interval, n, strict/flexible, chain statistics."""
    rows = []
    for r in results.values() if isinstance(results, dict) else results:
        chains = r.chain_stats or {}
        rows.append({
            "task": r.task, "mode": r.mode, "metric": r.metric, "value": r.value,
            "ci95": "" if r.ci_low is None else f"[{r.ci_low:.3f}, {r.ci_high:.3f}]", "n": r.n,
            "flexible": r.flexible_accuracy if r.flexible_accuracy is not None else r.details.get("loglik_accuracy_norm"),
            "complete": chains.get("complete_rate"), "steps": chains.get("mean_steps"),
            "gen_tokens": chains.get("mean_generated_tokens"), "truncated": chains.get("truncated_rate"),
            "tokens": r.details.get("n_tokens"), "seqlen": r.details.get("seqlen"),
            "sparsity": r.sparsity, "seconds": r.details.get("seconds"), "cached": r.cached,
        })
    return pd.DataFrame(rows)
