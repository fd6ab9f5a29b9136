"""Table 1 and its comparisons, from the records of a sweep (:mod:`cap_lab.sweep`; paper Sec. 5).

* :func:`table1`: one row per (model, method, sparsity), one column per task and mode, each
  value with its own confidence interval (the paper's layout, for reading);
* :func:`paired_differences`: CAP vs Wanda, CAP vs dense and Wanda vs dense on the *same*
  examples: the accuracy difference with a paired bootstrap 95% interval and the exact
  McNemar p-value, and for perplexity the paired difference of per-window mean NLL
  (:mod:`cap_lab.stats`). Independent intervals of +/-15 points cannot separate two methods
  that a paired test can;
* :func:`table1_long`: the machine-readable Table 1 (one row per model, method, sparsity, task
  and mode) with the paired columns ``delta_vs_wanda``, ``delta_ci_low``, ``delta_ci_high`` and
  ``mcnemar_p`` on every CAP row and ``delta_vs_dense`` (with its interval and p) on CAP and
  Wanda rows;
* :func:`cap_vs_wanda` (unpaired: do the independent intervals overlap) and
  :func:`markdown_table`.

For perplexity a negative delta favours the first method (lower NLL); for accuracy a positive one.
"""
from __future__ import annotations

import pandas as pd

from cap_lab.stats import N_RESAMPLES, SEED, align, paired_accuracy, paired_nll
from cap_lab.sweep import DENSE

#: (a, b) pairs compared example by example: a minus b
COMPARISONS = (("cap", "wanda"), ("cap", DENSE), ("wanda", DENSE))
PAIRED_COLUMNS = ["model", "sparsity", "task", "mode", "a", "b", "delta", "ci_low", "ci_high", "mcnemar_p", "n",
                  "discordant_a", "discordant_b"]


METHOD_NAMES = {DENSE: "Dense", "magnitude": "Magnitude", "wanda": "Wanda", "cap": "CAP"}
TASK_NAMES = {"gsm8k": "GSM8K", "strategyqa": "StrategyQA", "arc_challenge": "ARC-C.", "wikitext2": "WikiText-2"}


def _cell_text(value: float, low: float, high: float, mode: str) -> str:
    if mode == "ppl":
        return f"{value:.2f} [{low:.2f}, {high:.2f}]"
    return f"{100 * value:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def table1(results: pd.DataFrame) -> pd.DataFrame:
    """Table 1: one row per (model, method, sparsity), one column per task and mode.

    Accuracies are in percent, perplexity as is, each followed by its confidence interval.
    """
    df = results.copy()
    df["column"] = [f"{TASK_NAMES.get(t, t)} ({m})" if m != "ppl" else "WikiText-2 ppl" for t, m in zip(df["task"], df["mode"])]
    df["text"] = [_cell_text(v, lo, hi, m) for v, lo, hi, m in zip(df["value"], df["ci_low"], df["ci_high"], df["mode"])]
    order = {m: i for i, m in enumerate(METHOD_NAMES)}
    df["_order"] = df["method"].map(order)
    wide = df.pivot_table(index=["model", "sparsity", "_order", "method"], columns="column", values="text", aggfunc="first")
    wide = wide.reset_index().sort_values(["model", "sparsity", "_order"]).drop(columns="_order")
    wide["method"] = wide["method"].map(METHOD_NAMES)
    wide["sparsity"] = [f"{s:.0%}" for s in wide["sparsity"]]
    cols = [c for mode in ("loglik", "cot") for t in TASK_NAMES.values() for c in [f"{t} ({mode})"] if c in wide.columns]
    wide = wide[["model", "method", "sparsity"] + cols + [c for c in ["WikiText-2 ppl"] if c in wide.columns]]
    wide.columns.name = None
    return wide.reset_index(drop=True)


def cap_vs_wanda(results: pd.DataFrame) -> pd.DataFrame:
    """CAP minus Wanda at each (model, sparsity, task, mode), with whether the CIs overlap.

    ``better`` is from CAP's side: higher accuracy, lower perplexity.
    """
    key = ["model", "sparsity", "task", "mode"]
    cap = results[results["method"] == "cap"].set_index(key)
    wanda = results[results["method"] == "wanda"].set_index(key)
    both = cap.join(wanda, lsuffix="_cap", rsuffix="_wanda", how="inner")
    out = pd.DataFrame({"cap": both["value_cap"], "wanda": both["value_wanda"]})
    out["difference"] = out["cap"] - out["wanda"]
    lower_is_better = both.index.get_level_values("mode") == "ppl"
    out["cap_better"] = [(d < 0) if low else (d > 0) for d, low in zip(out["difference"], lower_is_better)]
    out["cis_overlap"] = (both["ci_low_cap"] <= both["ci_high_wanda"]) & (both["ci_low_wanda"] <= both["ci_high_cap"])
    return out.reset_index()


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``df`` (no index)."""
    cells = [[str(c) for c in df.columns]] + [[str(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("---" for _ in df.columns) + "|")
    return "\n".join(lines) + "\n"


def _outcomes_by_cell(records: list[dict]) -> dict[tuple, dict]:
    """{(model, method, sparsity, task, mode): {example id: outcome}} of sweep records."""
    out = {}
    for r in records:
        for row in r["rows"]:
            out[(r["model"], r["method"], float(r["sparsity"]), row["task"], row["mode"])] = row["outcomes"]
    return out


def paired_differences(records: list[dict], n_resamples: int = N_RESAMPLES, seed: int = SEED,
                       comparisons=COMPARISONS) -> pd.DataFrame:
    """Every comparison of ``comparisons`` at every sparsity, task and mode of the sweep.

    Args:
        records: :attr:`cap_lab.sweep.SweepResult.records` (rows with per-example outcomes).
        n_resamples: bootstrap resamples.
        seed: bootstrap seed.
        comparisons: ``(a, b)`` method pairs, a minus b (default :data:`COMPARISONS`); ``b`` =
            ``dense`` is the dense record whatever a's sparsity.

    Returns:
        One row per (model, sparsity, task, mode, a, b): ``delta`` (accuracy of a minus b, or
        mean NLL of a minus b in nats/token for ``ppl``), its 95% interval, ``mcnemar_p``
        (accuracy only), ``n`` and the discordant counts.
    """
    cells = _outcomes_by_cell(records)
    rows = []
    for (model, method, sparsity, task, mode), outcomes in cells.items():
        for a, b in comparisons:
            if method != a or a == DENSE:
                continue
            other = cells.get((model, b, 0.0 if b == DENSE else sparsity, task, mode))
            if other is None:
                continue
            xa, xb = align(outcomes, other)
            d = (paired_nll if mode == "ppl" else paired_accuracy)(xa, xb, n_resamples=n_resamples, seed=seed)
            rows.append(dict(model=model, sparsity=sparsity, task=task, mode=mode, a=a, b=b, delta=d.delta,
                             ci_low=d.ci_low, ci_high=d.ci_high, mcnemar_p=d.mcnemar_p, n=d.n,
                             discordant_a=d.discordant_a, discordant_b=d.discordant_b))
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS).sort_values(["model", "sparsity", "a", "b", "mode", "task"],
                                                                 ignore_index=True)


def table1_long(results: pd.DataFrame, paired: pd.DataFrame) -> pd.DataFrame:
    """Machine-readable Table 1: :meth:`SweepResult.results` rows joined with the paired columns."""
    key = ["model", "sparsity", "task", "mode"]
    out = results.drop(columns=[c for c in ("achieved_sparsity",) if c in results]).copy()
    for b, names in (("wanda", ("delta_vs_wanda", "delta_ci_low", "delta_ci_high", "mcnemar_p")),
                     (DENSE, ("delta_vs_dense", "dense_delta_ci_low", "dense_delta_ci_high", "dense_mcnemar_p"))):
        part = paired[paired["b"] == b].rename(columns=dict(zip(("delta", "ci_low", "ci_high", "mcnemar_p"), names)))
        part = part.rename(columns={"a": "method"})[key + ["method", *names]]
        out = out.merge(part, on=key + ["method"], how="left")
    return out


def _paired_text(delta: float, low: float, high: float, p: float | None, mode: str) -> str:
    if mode == "ppl":  # nats per token
        return f"{delta:+.3f} [{low:+.3f}, {high:+.3f}]"
    return f"{100 * delta:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}], p={p:.3g}"  # points of accuracy


def paired_markdown(paired: pd.DataFrame) -> str:
    """The paired differences as a Markdown table: accuracy in points (with McNemar's p), NLL in nats/token."""
    df = paired.copy()
    df["comparison"] = [f"{METHOD_NAMES.get(a, a)} - {METHOD_NAMES.get(b, b)}" for a, b in zip(df["a"], df["b"])]
    df["column"] = [f"{TASK_NAMES.get(t, t)} ({m})" if m != "ppl" else "WikiText-2 NLL" for t, m in zip(df["task"], df["mode"])]
    df["text"] = [_paired_text(r.delta, r.ci_low, r.ci_high, r.mcnemar_p, r.mode) for r in df.itertuples()]
    df["sparsity"] = [f"{s:.0%}" for s in df["sparsity"]]
    wide = df.pivot_table(index=["model", "sparsity", "comparison"], columns="column", values="text", aggfunc="first")
    wide.columns.name = None
    return markdown_table(wide.reset_index())


def wall_time_summary(times: pd.DataFrame) -> pd.DataFrame:
    """Minutes per model and stage, summed over a sweep's cells, with each model's total.

    Args:
        times: :meth:`cap_lab.sweep.SweepResult.wall_times` (of one or more models).

    Returns:
        One row per model: ``model``, one column per stage (``prune``, ``loglik arc_challenge``,
        ...) and ``total``, in minutes.
    """
    minutes = times.assign(minutes=times["seconds"] / 60)
    out = minutes.pivot_table(index="model", columns="stage", values="minutes", aggfunc="sum", sort=False)
    out["total"] = out.sum(axis=1)
    return out.reset_index().rename_axis(columns=None)
