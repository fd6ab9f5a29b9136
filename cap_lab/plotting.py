"""Figures of the notebooks (paper Fig. 2, Table 1, Sec. 5.3) and the one function that saves them.

Every plotting function takes tidy data (tensors or DataFrames from :mod:`cap_lab.scoring`
and :mod:`cap_lab.sweep`) and returns a matplotlib ``Figure`` with a title, labelled axes with
units, a legend where there is more than one series, and a note of the model and profile.

:func:`save_output` is the only writer: it saves a figure (PNG), a DataFrame (CSV) or a text
(Markdown) into the profile's figures folder and records its provenance in that folder's
``MANIFEST.json``: git commit (and whether the tree had uncommitted changes), profile, model,
settings, and time.
"""
from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from scipy.stats import spearmanr

from cap_lab.config import Profile, figures_dir, get_profile, repo_root
from cap_lab.io import atomic_write, atomic_write_text

MANIFEST = "MANIFEST.json"
PALETTE = {"dense": "#444444", "magnitude": "#8c8c8c", "wanda": "#1f77b4", "cap": "#d62728"}


# ------------------------------------------------------------------ provenance + saving
def git_commit(root: Path | None = None) -> dict:
    """``{"commit": sha or None, "dirty": bool}`` of the checkout at ``root``."""
    root = root or repo_root()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return {"commit": sha, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def safe_name(text: str) -> str:
    """A file-name-safe version of a model name (``meta-llama/Llama-3`` -> ``meta-llama--Llama-3``)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text.replace("/", "--"))


def save_output(obj, filename: str, *, profile: Profile | str | None, model: str | None = None,
                settings: dict | None = None, description: str = "", out_dir: str | os.PathLike | None = None) -> Path:
    """Write a figure, table or text to the figures folder and record it in ``MANIFEST.json``.

    Args:
        obj: a matplotlib ``Figure`` (saved as PNG, 150 dpi), a ``DataFrame`` (CSV) or a
            ``str`` (written as is, e.g. a Markdown table).
        filename: the file name; it should carry the model (see :func:`safe_name`).
        profile: the profile that produced it (its figures folder is the default destination).
        model: the model it shows (``None`` for multi-model outputs).
        settings: what determined it (calibration, sparsities, ...); JSON-serialisable.
        description: one line on what it shows (used by ``figures/README.md``).
        out_dir: override the destination folder.

    Returns:
        The written path.
    """
    profile = get_profile(profile)
    folder = Path(out_dir) if out_dir is not None else figures_dir(profile)
    path = folder / filename  # the atomic writes create the folder
    if isinstance(obj, Figure):
        if path.suffix != ".png":
            raise ValueError(f"figure file {filename!r} must end in .png")
        atomic_write(path, lambda tmp: obj.savefig(tmp, format="png", dpi=150, bbox_inches="tight"))
    elif isinstance(obj, pd.DataFrame):
        atomic_write(path, lambda tmp: obj.to_csv(tmp, index=False))
    elif isinstance(obj, str):
        atomic_write_text(path, obj)
    else:
        raise ValueError(f"cannot save a {type(obj).__name__}; allowed: matplotlib Figure, pandas DataFrame, str")
    entry = dict(git_commit(), profile=profile.name, model=model, description=description,
                 settings=settings if settings is not None else profile.to_dict(),
                 created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    _update_manifest(folder, filename, entry)
    return path


def _update_manifest(folder: Path, filename: str, entry: dict) -> None:
    manifest = folder / MANIFEST
    data = json.loads(manifest.read_text()) if manifest.is_file() else {}
    data[filename] = entry
    atomic_write_text(manifest, json.dumps(dict(sorted(data.items())), indent=2, default=str) + "\n")


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def _note(fig: Figure, model: str | None, profile: Profile | str | None) -> None:
    name = get_profile(profile).name if profile is not None else "?"
    fig.text(0.99, 0.005, f"model: {model or 'several'} | profile: {name}", ha="right", va="bottom", fontsize=7, color="#666666")


# ------------------------------------------------------------------ notebook 01: calibration
def calibration_lengths(frame: pd.DataFrame, *, model: str, profile=None) -> Figure:
    """Token counts per task and length quartile (frame: :meth:`CalibrationSet.to_frame`)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    sns.boxplot(data=frame, x="task", y="tokens", hue="quartile", ax=axes[0], palette="viridis")
    axes[0].set(title="Calibration example length by task and quartile", xlabel="task", ylabel="tokens per example")
    axes[0].legend(title="length quartile", fontsize=7)
    counts = frame.groupby(["subset", "task"])["target_tokens"].sum().unstack("task")
    counts.plot.bar(stacked=True, ax=axes[1])
    axes[1].set(title="Target tokens in each of the K subsets", xlabel="subset k", ylabel="target tokens")
    axes[1].legend(title="task", fontsize=7)
    _note(fig, model, profile)
    fig.tight_layout()
    return fig


def intact_losses(hs, *, model: str, profile=None) -> Figure:
    """Intact mean target loss of each subset (the baseline of Eq. 2)."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    losses = hs.intact_losses.numpy()
    ax.bar(range(len(losses)), losses, color="#1f77b4", label="subset loss")
    ax.axhline(losses.mean(), color="k", ls="--", lw=1, label=f"mean {losses.mean():.3f}")
    ax.set(title="Intact loss per calibration subset", xlabel="subset k", ylabel="cross-entropy (nats / target token)")
    ax.set_xticks(range(len(losses)))
    ax.legend(fontsize=8)
    _note(fig, model, profile)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ notebook 02: head importance
def head_heatmap(values: torch.Tensor, *, title: str, model: str, profile=None, label: str = "causal score (nats)",
                 cmap: str = "rocket_r", ax=None, center: float | None = None) -> Figure:
    """A layers x heads heatmap (paper Fig. 2). values: (L, H)."""
    own = ax is None
    if own:
        L, H = values.shape
        fig, ax = plt.subplots(figsize=(min(3 + 0.45 * H, 12), min(2 + 0.22 * L, 10)))
    else:
        fig = ax.figure
    sns.heatmap(values.float().numpy(), ax=ax, cmap=cmap, center=center, cbar_kws={"label": label})
    ax.set(title=title, xlabel="head", ylabel="layer")
    if own:
        _note(fig, model, profile)
        fig.tight_layout()
    return fig


def score_distribution(scores: torch.Tensor, *, model: str, profile=None) -> Figure:
    """Histogram of head scores and their sorted curve (how few heads matter)."""
    s = scores.flatten().float().numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    sns.histplot(s, bins=40, ax=axes[0], color="#d62728")
    axes[0].set(title="Distribution of causal head scores", xlabel="causal score (nats)", ylabel="heads")
    axes[1].plot(np.sort(s)[::-1], marker=".", lw=1, color="#d62728", label="heads, by score")
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set(title="Head scores, sorted", xlabel="rank", ylabel="causal score (nats)")
    axes[1].legend(fontsize=8)
    _note(fig, model, profile)
    fig.tight_layout()
    return fig


def top_heads(scores: torch.Tensor, k: int = 10) -> pd.DataFrame:
    """The ``k`` heads with the highest scores: layer, head, score."""
    flat = scores.flatten()
    top = torch.topk(flat, min(k, flat.numel()))
    H = scores.shape[1]
    return pd.DataFrame({"layer": (top.indices // H).tolist(), "head": (top.indices % H).tolist(),
                         "score": top.values.tolist()})


def rank_correlations(named_scores: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Spearman rank correlation between every pair of (L, H) score maps (square DataFrame)."""
    names = list(named_scores)
    flat = np.stack([named_scores[n].flatten().double().numpy() for n in names])
    out = np.ones((len(names), len(names)))
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            out[i, j] = out[j, i] = spearmanr(flat[i], flat[j]).statistic
    return pd.DataFrame(out, index=names, columns=names)


def rank_stability(corr: pd.DataFrame, *, model: str, profile=None, title: str = "Head-ranking stability") -> Figure:
    """Heatmap of a :func:`rank_correlations` matrix."""
    n = len(corr)
    fig, ax = plt.subplots(figsize=(2.5 + 0.8 * n, 1.8 + 0.7 * n))
    sns.heatmap(corr, annot=True, fmt=".2f", vmin=-1, vmax=1, cmap="vlag", ax=ax, cbar_kws={"label": "Spearman rho"})
    ax.set(title=title, xlabel="score estimate", ylabel="score estimate")
    _note(fig, model, profile)
    fig.tight_layout()
    return fig


def median_vs_mean(median: torch.Tensor, mean: torch.Tensor, *, model: str, profile=None) -> Figure:
    """Median- and mean-aggregated scores side by side, and against each other."""
    L, H = median.shape
    fig, axes = plt.subplots(1, 3, figsize=(min(6 + 0.9 * H, 16), min(2.5 + 0.2 * L, 9)))
    head_heatmap(median, title="median over subsets (Eq. 2)", model=model, ax=axes[0])
    head_heatmap(mean, title="mean over subsets", model=model, ax=axes[1])
    axes[2].scatter(mean.flatten().numpy(), median.flatten().numpy(), s=10, color="#d62728", label="one head")
    lo, hi = float(min(mean.min(), median.min())), float(max(mean.max(), median.max()))
    axes[2].plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
    axes[2].set(title="median vs mean", xlabel="mean-aggregated score (nats)", ylabel="median-aggregated score (nats)")
    axes[2].legend(fontsize=8)
    _note(fig, model, profile)
    fig.tight_layout()
    return fig


def stability_curve(study: pd.DataFrame, *, model: str, profile=None, threshold: float = 0.8) -> Figure:
    """Head-score agreement of two disjoint calibration draws vs their size (:func:`cap_lab.stability.stability_study`).

    Panels: Spearman (with the ``threshold`` line), top-10% overlap, and the fraction of weights
    CAP prunes differently at the study's sparsity; one line per scorer.
    """
    df = study[study["model"] == model]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for (col, label), ax in zip([("spearman", "Spearman rho"), ("top_overlap", "top-10% overlap"),
                                 ("pruned_differently", "weights pruned differently (%)")], axes):
        for i, (method, part) in enumerate(df.groupby("method")):
            part = part.sort_values("n_per_task")
            ax.plot(part["n_per_task"], part[col] * (100 if col == "pruned_differently" else 1), marker="o", color=f"C{i}", label=method)
        ax.set(xscale="log", xlabel="calibration examples per task (each draw)", ylabel=label, title=label)
        ax.legend(fontsize=8)
    axes[0].axhline(threshold, color="k", ls="--", lw=0.8)
    fig.suptitle(f"Head-score stability between two disjoint calibration draws (K fixed): {model}")
    _note(fig, model, profile)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ notebooks 03 and 04: the sweep
def accuracy_vs_sparsity(results: pd.DataFrame, *, model: str, profile=None) -> Figure:
    """One panel per task and mode: value vs sparsity for each method, with 95% CI bars; dense at 0.

    Methods are shifted by a percentage point along x so that equal values stay visible.
    """
    df = results[results["model"] == model]
    panels = df[["task", "mode"]].drop_duplicates().values.tolist()
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    dense = df[df["method"] == "dense"]
    offsets = {"magnitude": -1.0, "wanda": 0.0, "cap": 1.0}
    for ax, (task, mode) in zip(axes.flat, panels):
        part = df[(df["task"] == task) & (df["mode"] == mode)]
        base = dense[(dense["task"] == task) & (dense["mode"] == mode)]
        scale = 1 if mode == "ppl" else 100
        for method in [m for m in PALETTE if m != "dense" and m in set(part["method"])]:
            rows = pd.concat([base, part[part["method"] == method]]).sort_values("sparsity")
            low = (rows["value"] - rows["ci_low"]).fillna(0)
            high = (rows["ci_high"] - rows["value"]).fillna(0)
            ax.errorbar(100 * rows["sparsity"] + offsets.get(method, 0), scale * rows["value"], yerr=[scale * low, scale * high],
                        marker="o", ms=4, capsize=3, color=PALETTE[method], label=method)
        ax.set(title=f"{task} ({mode})", xlabel="sparsity (%)",
               ylabel="perplexity (lower is better)" if mode == "ppl" else "accuracy (%)")
        if mode == "ppl":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"Accuracy and perplexity vs sparsity (dense at 0%): {model}")
    _note(fig, model, profile)
    fig.tight_layout()
    return fig


def paired_differences(paired: pd.DataFrame, *, model: str, profile=None) -> Figure:
    """Paired differences with their 95% intervals (:func:`cap_lab.tables.paired_differences`).

    One panel per comparison (CAP - Wanda, CAP - dense, Wanda - dense), one row per task, mode
    and sparsity; accuracy in points, WikiText-2 as mean NLL in nats/token (x100 so both fit one
    axis: a row's label says which). An interval that excludes 0 is drawn filled.
    """
    df = paired[paired["model"] == model] if "model" in paired else paired
    pairs = list(dict.fromkeys(zip(df["a"], df["b"])))
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.4 * len(pairs), 0.45 * max(4, len(df) / max(1, len(pairs))) + 1.2),
                             squeeze=False, sharey=True)
    for ax, (a, b) in zip(axes.flat, pairs):
        part = df[(df["a"] == a) & (df["b"] == b)].sort_values(["mode", "task", "sparsity"])
        labels = [f"{t} ({'NLL x100' if m == 'ppl' else m}) {s:.0%}" for t, m, s in zip(part["task"], part["mode"], part["sparsity"])]
        y = range(len(part))
        for i, row in enumerate(part.itertuples()):
            significant = row.ci_low > 0 or row.ci_high < 0
            ax.errorbar(100 * row.delta, i, xerr=[[100 * (row.delta - row.ci_low)], [100 * (row.ci_high - row.delta)]],
                        fmt="o", mfc=PALETTE.get(a, "C0") if significant else "white", color=PALETTE.get(a, "C0"), capsize=3)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(list(y), labels, fontsize=7)
        ax.set(title=f"{a} - {b}", xlabel="difference (points; NLL: nats/token x100)")
    fig.suptitle(f"Paired differences, 95% bootstrap intervals (filled: excludes 0): {model}")
    _note(fig, model, profile)
    fig.tight_layout()
    return fig


def layer_sparsity(layers: pd.DataFrame, *, model: str, sparsity: float, profile=None, methods=("wanda", "cap")) -> Figure:
    """Achieved sparsity of each layer for each method at one target sparsity."""
    df = layers[(layers["model"] == model) & np.isclose(layers["sparsity"], sparsity) & layers["method"].isin(methods)]
    fig, ax = plt.subplots(figsize=(9, 3.4))
    for method, part in df.groupby("method"):
        ax.plot(part["layer"], 100 * part["layer_sparsity"], marker="o", ms=3, color=PALETTE.get(method), label=method)
    ax.axhline(100 * sparsity, color="k", ls="--", lw=0.8, label=f"target {sparsity:.0%}")
    ax.set(title=f"Per-layer achieved sparsity at {sparsity:.0%} (CAP's global threshold vs Wanda)",
           xlabel="layer", ylabel="zeros in prunable weights (%)")
    ax.legend(fontsize=8)
    _note(fig, model, profile)
    fig.tight_layout()
    return fig


def perplexity_vs_accuracy(results: pd.DataFrame, *, model: str, mode: str = "loglik", profile=None) -> Figure:
    """Sec. 5.3: WikiText-2 perplexity against accuracy, one point per method and sparsity.

    One panel per reasoning task; the dense model is the star.
    """
    df = results[results["model"] == model]
    ppl = df[df["mode"] == "ppl"].set_index(["method", "sparsity"])["value"].rename("ppl")
    tasks = [t for t in df[df["mode"] == mode]["task"].unique()]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        acc = df[(df["task"] == task) & (df["mode"] == mode)].set_index(["method", "sparsity"])
        both = acc.join(ppl, how="inner").reset_index()
        for method in [m for m in PALETTE if m in set(both["method"])]:
            part = both[both["method"] == method]
            dense = method == "dense"
            ax.errorbar(part["ppl"], 100 * part["value"],
                        yerr=[100 * (part["value"] - part["ci_low"]), 100 * (part["ci_high"] - part["value"])],
                        fmt="*" if dense else "o", ms=14 if dense else 7, capsize=3, color=PALETTE[method],
                        label="dense" if dense else method)
            for _, r in part.iterrows():
                if not dense:
                    ax.annotate(f"{r['sparsity']:.0%}", (r["ppl"], 100 * r["value"]), fontsize=7, xytext=(4, 3),
                                textcoords="offset points")
        ax.set_xscale("log")
        ax.set(title=f"{task} ({mode}) vs perplexity", xlabel="WikiText-2 perplexity (log scale)", ylabel="accuracy (%)")
        ax.legend(fontsize=8)
    fig.suptitle(f"Perplexity vs reasoning accuracy, every method and sparsity: {model}")
    _note(fig, model, profile)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ notebook 05: the explorer
def pruning_overview(summary: dict, *, model: str, method: str, sparsity: float, profile=None) -> Figure:
    """Fraction of each head's weights removed (heatmap) and per-layer sparsity (bars)."""
    heads = torch.tensor(summary["head_sparsity"])
    L, H = heads.shape
    fig, axes = plt.subplots(1, 2, figsize=(11, min(2.5 + 0.2 * L, 8)), gridspec_kw={"width_ratios": [1, 1.3]})
    head_heatmap(100 * heads, title="weights removed per head (q rows + o cols)", model=model, ax=axes[0],
                 label="removed (%)", cmap="mako_r")
    axes[1].bar(range(len(summary["by_layer"])), [100 * s for s in summary["by_layer"]], color=PALETTE.get(method, "#333333"),
                label=f"{method}")
    axes[1].axhline(100 * sparsity, color="k", ls="--", lw=0.8, label=f"target {sparsity:.0%}")
    axes[1].set(title="achieved sparsity per layer", xlabel="layer", ylabel="zeros in prunable weights (%)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{method} at {sparsity:.0%}: achieved {100 * summary['achieved_sparsity']:.2f}%")
    _note(fig, model, profile)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ figures/README.md
def write_figures_readme(folder: str | os.PathLike, profile: Profile | str | None, timings: dict | None = None) -> Path:
    """Regenerate ``README.md`` of a figures folder from its ``MANIFEST.json``.

    One section per file (the picture or table, the manifest's description), after the wall times.
    """
    profile = get_profile(profile)
    folder = Path(folder)
    manifest = read_manifest(folder)
    lines = ["# Figures and tables", "",
             f"Generated by `python scripts/run_notebooks.py --profile {profile.name}` (`make figures"
             f"{'' if profile.name == 'cpu' else ' PROFILE=' + profile.name}`) from the notebooks in "
             "`notebooks/`; never edited by hand. `MANIFEST.json` records, for every file, the git commit, profile, "
             "model, settings and time it was made.", ""]
    profiles = sorted({e["profile"] for e in manifest.values()})
    commits = sorted({(e.get("commit") or "?")[:10] + (" (uncommitted changes)" if e.get("dirty") else "") for e in manifest.values()})
    lines += [f"Profiles: {', '.join(profiles) or profile.name}. Commits: {', '.join(commits) or '-'}.", ""]
    if timings:  # {notebook: seconds} or {notebook: {"seconds", "finished"}}; reruns read stored results
        runs = {k: v if isinstance(v, dict) else {"seconds": v} for k, v in timings.items()}
        lines += ["Wall time of each notebook's latest run (a rerun reads the stored scores and cells):", "",
                  "| notebook | seconds | finished |", "|---|---|---|"]
        lines += [f"| {k} | {v['seconds']} | {v.get('finished', '-')} |" for k, v in runs.items()] + [""]
    for name, entry in manifest.items():
        lines += [f"## `{name}`", "", f"{entry.get('description') or ''} (model: {entry.get('model') or 'several'}, "
                  f"profile: {entry['profile']}, made {entry['created']})", ""]
        if name.endswith(".png"):
            lines += [f"![{name}]({name})", ""]
        elif name.endswith(".md"):
            lines += [(folder / name).read_text() if (folder / name).is_file() else f"[{name}]({name})", ""]
        else:
            lines += [f"[{name}]({name})", ""]
    return atomic_write_text(folder / "README.md", "\n".join(lines))
