"""The interactive explorer of notebook 05: pick a model, a method, a sparsity and a benchmark.

Moving a control shows, for that pruning, the fraction of each attention head's weights that
are removed (a layers x heads heatmap) and the achieved sparsity of every layer; the button runs
a quick evaluation on a small subset of the chosen benchmark, with a progress bar. All of it is
here, in plain functions and one small class, so the notebook only displays
``Explorer(...).widget()`` and the tests drive the same code without a browser.

Pruning summaries come from the sweep's cache (:func:`cap_lab.sweep.prune_summary`), so cells
that notebook 03 computed show at once; others are pruned once and cached.
"""
from __future__ import annotations

import io
import time

import ipywidgets as w
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from cap_lab.config import Profile, get_profile
from cap_lab.plotting import pruning_overview
from cap_lab.sweep import DENSE, SweepCell, SweepContext, evaluate_model, loglik_tasks, open_model, prune_cell, prune_summary

BENCHMARKS = ("gsm8k", "strategyqa", "arc_challenge", "wikitext2")
MATRIX_ORDER = ("q", "k", "v", "o", "gate", "up", "down")


def figure_png(fig: Figure) -> bytes:
    """PNG bytes of a figure (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def sparsity_text(summary: dict, method: str, sparsity: float) -> str:
    """The explorer's status line, e.g. ``cap at 20%: achieved sparsity 20.00% ...``."""
    order = [m for m in MATRIX_ORDER if m in summary["by_matrix"]]
    by_matrix = ", ".join(f"{m} {100 * summary['by_matrix'][m]:.1f}%" for m in order)
    layers = summary["by_layer"]
    return (f"{method} at {sparsity:.0%}: achieved sparsity {100 * summary['achieved_sparsity']:.2f}% "
            f"(layers {100 * min(layers):.1f}-{100 * max(layers):.1f}%; {by_matrix})")


def result_text(rows: list[dict], seconds: float) -> str:
    parts = []
    for r in rows:
        if r["mode"] == "ppl":
            parts.append(f"{r['task']} perplexity {r['value']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}] ({r['n']} windows)")
        else:
            parts.append(f"{r['task']} {r['mode']} accuracy {100 * r['value']:.1f}% "
                         f"[{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}] (n={r['n']})")
    return "; ".join(parts) + f" in {seconds:.1f} s"


class Explorer:
    """Widgets and their callbacks.

    Args:
        profile: run profile (models, sparsities, evaluation sizes).
        models: model choices (default: the profile's).
        data_dir: benchmark data folder.
        quick_limit: examples per quick evaluation (default: the profile's log-likelihood
            limit, at most 8).
    """

    def __init__(self, profile: Profile | str | None = None, models: tuple[str, ...] | None = None,
                 data_dir=None, quick_limit: int | None = None):
        self.profile = get_profile(profile)
        self.data_dir = data_dir
        self.quick_limit = quick_limit or min(8, self.profile.eval.loglik_limit or 8)
        self._contexts: dict[str, SweepContext] = {}
        models = tuple(models or self.profile.models)
        stops = sorted(set(self.profile.explorer_sparsities) | set(self.profile.sparsities))
        self.model = w.Dropdown(options=models, value=models[0], description="model")
        self.method = w.Dropdown(options=self.profile.methods, value="cap" if "cap" in self.profile.methods else self.profile.methods[0],
                                 description="method")
        first = self.profile.sparsities[0]  # a sweep cell: its summary is usually cached already
        self.sparsity = w.SelectionSlider(options=[(f"{s:.0%}", s) for s in stops], value=first, description="sparsity",
                                          continuous_update=False)
        self.benchmark = w.Dropdown(options=BENCHMARKS, value=BENCHMARKS[0], description="benchmark")
        self.run_button = w.Button(description="Quick evaluation", button_style="primary")
        self.progress = w.IntProgress(value=0, min=0, max=3, description="evaluation")
        self.status = w.HTML(value="")
        self.result = w.HTML(value="")
        self.image = w.Image(format="png")
        self.status.add_class("cap-sparsity-text")
        self.image.add_class("cap-pruning-plot")
        self.result.add_class("cap-eval-result")
        for control in (self.model, self.method, self.sparsity):
            control.observe(lambda change: self.refresh(), names="value")
        self.run_button.on_click(lambda _: self.quick_evaluate())

    # -------------------------------------------------------------- state
    def context(self) -> SweepContext:
        """The loaded model, calibration set and scores of the chosen model (loaded once)."""
        name = self.model.value
        if name not in self._contexts:
            self._contexts[name] = open_model(self.profile, name, data_dir=self.data_dir)
        return self._contexts[name]

    def cell(self) -> SweepCell:
        return SweepCell(self.method.value, float(self.sparsity.value))

    def summary(self) -> dict:
        return prune_summary(self.context(), self.cell())

    # -------------------------------------------------------------- callbacks
    def refresh(self) -> dict:
        """Recompute the plot and the sparsity text for the current controls."""
        cell = self.cell()
        self.status.value = f"<b>pruning {cell.method} to {cell.sparsity:.0%} ...</b>"
        summary = self.summary()
        fig = pruning_overview(summary, model=self.model.value, method=cell.method, sparsity=cell.sparsity, profile=self.profile)
        self.image.value = figure_png(fig)
        self.status.value = sparsity_text(summary, cell.method, cell.sparsity)
        return summary

    def quick_evaluate(self) -> list[dict]:
        """Prune the chosen cell, evaluate it on ``quick_limit`` examples of the benchmark, restore."""
        start = time.perf_counter()
        ctx, cell, task = self.context(), self.cell(), self.benchmark.value
        self.progress.value, self.result.value = 0, "pruning ..."
        prune_cell(ctx, cell)
        self.progress.value, self.result.value = 1, f"evaluating {task} ..."
        try:
            profile = _quick_profile(self.profile, self.quick_limit)
            if task == "wikitext2":
                rows = evaluate_model(ctx.lm, profile, data_dir=self.data_dir, loglik=(), cot=())
            elif task in loglik_tasks([task]):
                rows = evaluate_model(ctx.lm, profile, data_dir=self.data_dir, loglik=(task,), cot=(), ppl=False)
            else:  # GSM8K has no options to score: short greedy chain of thought
                rows = evaluate_model(ctx.lm, profile, data_dir=self.data_dir, loglik=(), cot=(task,), ppl=False)
        finally:
            ctx.dense.restore(ctx.lm.model)
        self.progress.value = 3
        self.result.value = result_text(rows, time.perf_counter() - start)
        return rows

    def widget(self) -> w.Widget:
        """The whole explorer, ready to display (and draws the first plot)."""
        self.refresh()
        controls = w.HBox([w.VBox([self.model, self.method]), w.VBox([self.sparsity, self.benchmark]),
                           w.VBox([self.run_button, self.progress])])
        return w.VBox([controls, self.status, self.image, self.result])


def _quick_profile(profile: Profile, limit: int) -> Profile:
    from dataclasses import replace

    ev = replace(profile.eval, loglik_limit=limit, cot_limit=limit, ppl_windows=1)
    return replace(profile, eval=ev)


__all__ = ["BENCHMARKS", "DENSE", "Explorer", "figure_png", "result_text", "sparsity_text"]
