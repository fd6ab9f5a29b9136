"""Figures of notebook 06 (the ablation grid of :mod:`cap_lab.ablations`).

Like :mod:`cap_lab.plotting` (whose :func:`~cap_lab.plotting.save_output` saves them), every
function takes tidy data and returns a titled ``Figure`` with labelled axes and a note of the
model and profile.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cap_lab.plotting import _note


def _pattern(method: str, sparsity: float) -> str:
    return method.split(" ", 1)[1] if " " in method else f"{sparsity:.0%}"


def ablation_overview(results: pd.DataFrame, *, model: str, profile=None) -> Figure:
    """Every variant's accuracy and perplexity per pattern (10/20/50%, N:M), with 95% intervals.

    One panel per task and mode; x: the variants; one marker series per pattern; the dense
    model is a dashed line.
    """
    df = results[results["model"] == model].copy()
    df["variant"] = df["method"].str.split(" ").str[0]
    df["pattern"] = [_pattern(m, s) for m, s in zip(df["method"], df["sparsity"])]
    dense = df[df["method"] == "dense"]
    df = df[df["method"] != "dense"]
    variants = list(dict.fromkeys(df["variant"]))
    patterns = list(dict.fromkeys(df.sort_values("sparsity")["pattern"]))
    panels = df[["task", "mode"]].drop_duplicates().values.tolist()
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.8 * len(variants) + 2), 3.2 * len(panels)), squeeze=False)
    for ax, (task, mode) in zip(axes.flat, panels):
        scale = 1 if mode == "ppl" else 100
        for j, pattern in enumerate(patterns):
            part = df[(df["task"] == task) & (df["mode"] == mode) & (df["pattern"] == pattern)].set_index("variant")
            x = np.array([variants.index(v) for v in part.index]) + 0.15 * (j - (len(patterns) - 1) / 2)
            err = [scale * (part["value"] - part["ci_low"]).fillna(0), scale * (part["ci_high"] - part["value"]).fillna(0)]
            ax.errorbar(x, scale * part["value"], yerr=err, fmt="o", ms=4, capsize=2, color=f"C{j}", label=pattern)
        base = dense[(dense["task"] == task) & (dense["mode"] == mode)]["value"]
        if len(base):
            ax.axhline(scale * base.iloc[0], color="k", ls="--", lw=0.8, label="dense")
        ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right", fontsize=8)
        ax.set(title=f"{task} ({mode})", ylabel="perplexity (log)" if mode == "ppl" else "accuracy (%)")
        if mode == "ppl":
            ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=len(patterns) + 1)
    fig.suptitle(f"Every method and variant at every pattern (95% intervals): {model}")
    _note(fig, model, profile)
    fig.tight_layout()
    return fig


def paired_vs_baseline(paired: pd.DataFrame, *, model: str, baseline: str = "wanda", profile=None) -> Figure:
    """Each variant minus ``baseline`` at the same pattern, paired, with bootstrap 95% intervals.

    ``paired``: :func:`cap_lab.tables.paired_differences` rows. One panel per task and mode;
    accuracy in points, WikiText-2 as mean NLL in nats/token x100; filled: the interval
    excludes 0.
    """
    df = paired[(paired["model"] == model) & (paired["b"].str.split(" ").str[0] == baseline)].copy()
    df["pattern"] = [_pattern(a, s) for a, s in zip(df["a"], df["sparsity"])]
    panels = df[["task", "mode"]].drop_duplicates().values.tolist()
    rows = list(dict.fromkeys(zip(df["a"].str.split(" ").str[0], df["pattern"])))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 0.28 * len(rows) + 1.6),
                             squeeze=False, sharey=True)
    for ax, (task, mode) in zip(axes.flat, panels):
        part = df[(df["task"] == task) & (df["mode"] == mode)]
        for r in part.itertuples():
            i = rows.index((r.a.split(" ")[0], r.pattern))
            hit = r.ci_low > 0 or r.ci_high < 0
            ax.errorbar(100 * r.delta, i, xerr=[[100 * (r.delta - r.ci_low)], [100 * (r.ci_high - r.delta)]], fmt="o",
                        ms=4, capsize=2, color="C3" if hit else "C0", mfc="C3" if hit else "white")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(range(len(rows)), [f"{v} {p}" for v, p in rows], fontsize=7)
        ax.set(title=f"{task} ({'NLL x100' if mode == 'ppl' else mode})", xlabel=f"minus {baseline} (points)")
    fig.suptitle(f"Paired differences against {baseline} at the same pattern (filled: 95% interval excludes 0): {model}")
    _note(fig, model, profile)
    fig.tight_layout()
    return fig
