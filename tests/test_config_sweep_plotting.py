"""Profiles, the cached sparsity sweep, figure provenance and the explorer, on tiny models."""
from __future__ import annotations

import json
from dataclasses import replace

import matplotlib

matplotlib.use("Agg")
import pandas as pd
import pytest
import torch

from cap_lab import plotting, sweep, tables
from cap_lab.config import PROFILES, figures_dir, get_profile, load_profile_model
from cap_lab.pruning import PruneConfig, prune_model
from conftest import fake_evaluate

TINY = get_profile("tiny")


# ------------------------------------------------------------------ config
def test_profiles_are_frozen_and_chosen_by_name_or_environment(monkeypatch):
    assert {"ci", "cpu", "cpu-full", "paper", "tiny"} <= set(PROFILES)
    monkeypatch.setenv("CAP_LAB_PROFILE", "ci")
    assert get_profile().name == "ci" and get_profile("paper").name == "paper"
    monkeypatch.delenv("CAP_LAB_PROFILE")
    assert get_profile().name == "cpu"
    with pytest.raises(ValueError, match="unknown profile 'nope'"):
        get_profile("nope")
    with pytest.raises(Exception):
        get_profile("ci").sparsities = (0.3,)
    cpu, paper = get_profile("cpu"), get_profile("paper")
    assert "gemma3-270m" in cpu.models and len(paper.models) == 2 and paper.sparsities == (0.1, 0.2, 0.5)
    assert all(p.sparsities == (0.1, 0.2, 0.5) for p in PROFILES.values())  # Table 1's columns everywhere
    assert paper.calibration.n_per_task >= 128 and paper.eval.ppl_windows == 100 and paper.eval.ppl_seqlen == 2048
    json.dumps(cpu.to_dict())


def test_ci_figures_never_go_to_the_committed_folder(monkeypatch):
    monkeypatch.delenv("CAP_LAB_FIGURES", raising=False)
    for name in ("ci", "tiny"):
        assert "executed" in figures_dir(get_profile(name)).parts
    assert figures_dir(get_profile("cpu")).name == "figures"


def test_profile_rejects_bad_methods_and_sparsities():
    with pytest.raises(ValueError, match="methods"):
        replace(TINY, methods=("sparsegpt",))
    with pytest.raises(ValueError, match="outside"):
        replace(TINY, sparsities=(1.0,))


# ------------------------------------------------------------------ sweep
def test_dense_weights_restore_is_bit_exact(tiny):
    before = tiny.fingerprint
    dense = sweep.DenseWeights(tiny.model)
    prune_model(tiny.model, PruneConfig("magnitude", 0.5))
    assert tiny.fingerprint != before
    dense.restore(tiny.model)
    assert tiny.fingerprint == before


def test_sweep_caches_every_cell_and_resumes(data_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep, "evaluate", fake_evaluate(calls))
    lm = load_profile_model("tiny-llama")
    dense_print = lm.fingerprint
    cells = sweep.sweep_cells(TINY)
    assert cells[0].method == "dense" and len(cells) == 1 + len(TINY.methods) * len(TINY.sparsities)
    first = sweep.run_sweep(TINY, lm, data_dir=data_dir, progress=False, cells=cells[:3])
    units = sweep.evaluation_units(TINY)
    assert units == [("loglik", "strategyqa"), ("loglik", "arc_challenge"), ("cot", "gsm8k"), ("cot", "strategyqa"),
                     ("cot", "arc_challenge"), ("ppl", "wikitext2")]
    n_calls = len(calls)
    assert n_calls == 3 * len(units)  # one evaluation per task and mode of each cell
    assert lm.fingerprint == dense_print  # the model is dense again after the sweep
    full = sweep.run_sweep(TINY, lm, data_dir=data_dir, progress=False)
    assert len(calls) == n_calls + len(units) * (len(cells) - 3)  # only the missing cells ran
    assert full.records[:3] == first.records
    res = full.results()
    assert set(res["method"]) == {"dense", *TINY.methods}
    for r in full.records:
        assert abs(r["achieved_sparsity"] - r["sparsity"]) < 0.02  # wanda: int(32 * s) per row
        assert len(r["by_layer"]) == 3 and torch.tensor(r["head_sparsity"]).shape == (3, 4)
    layers = full.layer_sparsity()
    assert len(layers) == 3 * len(cells)


def test_an_interrupted_cell_resumes_at_the_task_it_was_on(data_dir, monkeypatch, tmp_path):
    calls = []
    real = fake_evaluate(calls)

    def evaluate(lm, tasks, settings, **kwargs):
        if len(calls) == 2:  # the third task of the first run: as if the user pressed Ctrl-C
            calls.append("interrupted")
            raise KeyboardInterrupt
        return real(lm, tasks, settings, **kwargs)

    monkeypatch.setattr(sweep, "evaluate", evaluate)
    profile = replace(TINY, results_dir=str(tmp_path / "results"))  # absolute: used as is
    assert sweep.results_root(profile) == tmp_path / "results"
    lm = load_profile_model("tiny-llama")
    dense_print = lm.fingerprint
    cell = sweep.SweepCell("wanda", 0.5)
    ctx = sweep.open_model(profile, lm, data_dir=data_dir)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_cell(ctx, cell)
    assert lm.fingerprint == dense_print  # restored even after the interruption
    assert len(list((tmp_path / "results" / "rows").iterdir())) == 2  # the two finished tasks are stored
    record = sweep.run_cell(ctx, cell)
    units = sweep.evaluation_units(profile)
    assert len(calls) == 3 + len(units) - 2  # the finished tasks were not evaluated again
    assert [(r["mode"], r["task"]) for r in record["rows"]] == units
    assert all(r["seconds"] >= 0 for r in record["rows"]) and abs(record["achieved_sparsity"] - 0.5) < 0.02
    assert sweep.run_cell(ctx, cell) == record and len(calls) == 3 + len(units) - 2  # the whole cell is stored


def test_the_cpu_full_profile_evaluates_whole_splits_and_commits_its_results():
    full = get_profile("cpu-full")
    plan = full.eval
    assert plan.loglik_limit is None and plan.cot_limit == 0 and (plan.ppl_seqlen, plan.ppl_windows) == (2048, 40)
    assert sweep.evaluation_units(full) == [("loglik", "strategyqa"), ("loglik", "arc_challenge"), ("ppl", "wikitext2")]
    assert full.sparsities == (0.1, 0.2, 0.5) and full.methods == ("magnitude", "wanda", "cap")
    assert full.results_dir == "results/cpu-full" and full.calibration == get_profile("cpu").calibration
    assert sweep.results_root(full) == plotting.repo_root() / "results" / "cpu-full"
    assert sweep.results_root(TINY) == sweep.cache_root()


def test_table1_and_cap_vs_wanda_on_a_handmade_frame():
    rows = []
    for method, s, acc, ppl in [("dense", 0.0, 0.6, 10.0), ("wanda", 0.2, 0.5, 12.0), ("cap", 0.2, 0.55, 14.0)]:
        rows.append(dict(model="m", method=method, sparsity=s, achieved_sparsity=s, task="arc_challenge", mode="loglik",
                         metric="accuracy", value=acc, ci_low=acc - 0.1, ci_high=acc + 0.1, n=100))
        rows.append(dict(model="m", method=method, sparsity=s, achieved_sparsity=s, task="wikitext2", mode="ppl",
                         metric="ppl", value=ppl, ci_low=ppl - 0.5, ci_high=ppl + 0.5, n=4))
    df = pd.DataFrame(rows)
    table = tables.table1(df)
    assert list(table["method"]) == ["Dense", "Wanda", "CAP"]
    assert table.loc[2, "ARC-C. (loglik)"] == "55.0 [45.0, 65.0]" and table.loc[1, "WikiText-2 ppl"] == "12.00 [11.50, 12.50]"
    md = tables.markdown_table(table)
    assert md.count("\n") == 5 and md.startswith("| model | method |")
    versus = tables.cap_vs_wanda(df).set_index("task")
    assert versus.loc["arc_challenge", "cap_better"] and not versus.loc["wikitext2", "cap_better"]
    assert versus.loc["arc_challenge", "cis_overlap"] and not versus.loc["wikitext2", "cis_overlap"]


def _record(method: str, sparsity: float, correct: list[int], nll: list[float]) -> dict:
    acc = sum(correct) / len(correct)
    return {"model": "m", "method": method, "sparsity": sparsity, "achieved_sparsity": sparsity, "rows": [
        {"task": "arc_challenge", "mode": "loglik", "metric": "loglik_accuracy", "value": acc, "ci_low": 0.0,
         "ci_high": 1.0, "n": len(correct), "outcomes": {f"q{i}": c for i, c in enumerate(correct)}},
        {"task": "wikitext2", "mode": "ppl", "metric": "perplexity", "value": 2.0, "ci_low": 1.0, "ci_high": 3.0,
         "n": len(nll), "outcomes": {str(i): v for i, v in enumerate(nll)}}]}


def test_paired_differences_and_the_long_table1_on_handmade_records():
    records = [_record("dense", 0.0, [1, 1, 1, 1, 0, 1], [2.0, 2.0, 2.0]),
               _record("wanda", 0.2, [1, 0, 1, 0, 0, 1], [2.5, 2.4, 2.6]),
               _record("cap", 0.2, [1, 1, 1, 0, 1, 1], [2.2, 2.6, 2.3])]
    paired = tables.paired_differences(records, n_resamples=2000)
    assert set(zip(paired["a"], paired["b"])) == {("cap", "wanda"), ("cap", "dense"), ("wanda", "dense")}
    acc = paired[(paired["a"] == "cap") & (paired["b"] == "wanda") & (paired["mode"] == "loglik")].iloc[0]
    assert acc["delta"] == pytest.approx(2 / 6) and (acc["discordant_a"], acc["discordant_b"]) == (2, 0)
    assert acc["mcnemar_p"] == pytest.approx(0.5)  # 2 * P[Bin(2, 1/2) <= 0]
    nll = paired[(paired["a"] == "cap") & (paired["b"] == "dense") & (paired["mode"] == "ppl")].iloc[0]
    assert nll["delta"] == pytest.approx((0.2 + 0.6 + 0.3) / 3)
    results = sweep.SweepResult(TINY, records).results()
    long = tables.table1_long(results, paired)
    cap = long[(long["method"] == "cap") & (long["mode"] == "loglik")].iloc[0]
    assert cap["delta_vs_wanda"] == pytest.approx(2 / 6) and cap["mcnemar_p"] == pytest.approx(0.5)
    assert {"delta_ci_low", "delta_ci_high", "delta_vs_dense", "dense_mcnemar_p"} <= set(long.columns)
    assert long[long["method"] != "cap"]["delta_vs_wanda"].isna().all()
    md = tables.paired_markdown(paired)
    assert "CAP - Wanda" in md and "+33.3 [" in md and "p=0.5" in md
    fig = plotting.paired_differences(paired, model="m", profile=TINY)
    assert len(fig.axes) >= 1


# ------------------------------------------------------------------ plotting
def test_save_output_records_provenance(tmp_path):
    fig = plotting.head_heatmap(torch.arange(12.0).view(3, 4), title="t", model="tiny-llama", profile=TINY)
    png = plotting.save_output(fig, "02_x_tiny-llama.png", profile=TINY, model="tiny-llama", settings={"a": 1},
                               description="d", out_dir=tmp_path)
    plotting.save_output(pd.DataFrame({"a": [1]}), "t.csv", profile=TINY, out_dir=tmp_path)
    plotting.save_output("| a |\n", "t.md", profile=TINY, out_dir=tmp_path)
    assert png.read_bytes()[:4] == b"\x89PNG"
    manifest = plotting.read_manifest(tmp_path)
    assert set(manifest) == {"02_x_tiny-llama.png", "t.csv", "t.md"}
    entry = manifest["02_x_tiny-llama.png"]
    assert entry["profile"] == "tiny" and entry["model"] == "tiny-llama" and entry["settings"] == {"a": 1}
    assert {"commit", "dirty", "created", "description"} <= set(entry)
    with pytest.raises(ValueError, match="cannot save a int"):
        plotting.save_output(3, "x.txt", profile=TINY, out_dir=tmp_path)
    timings = {"01_calibration": 1.0, "02_head_importance": {"seconds": 2.5, "finished": "2026-12-03T10:00:00+00:00"}}
    readme = plotting.write_figures_readme(tmp_path, TINY, timings).read_text()
    assert "![02_x_tiny-llama.png](02_x_tiny-llama.png)" in readme and "| 01_calibration | 1.0 | - |" in readme
    assert "| 02_head_importance | 2.5 | 2026-12-03T10:00:00+00:00 |" in readme
    assert "`python scripts/run_notebooks.py --profile tiny` (`make figures PROFILE=tiny`)" in readme


def test_rank_correlations_and_top_heads():
    a = torch.arange(12.0).view(3, 4)
    corr = plotting.rank_correlations({"a": a, "b": 2 * a, "c": -a})
    assert corr.loc["a", "b"] == pytest.approx(1.0) and corr.loc["a", "c"] == pytest.approx(-1.0)
    top = plotting.top_heads(a, k=2)
    assert top[["layer", "head"]].values.tolist() == [[2, 3], [2, 2]]
    assert plotting.safe_name("meta-llama/Llama 3") == "meta-llama--Llama-3"


# ------------------------------------------------------------------ widgets
@pytest.mark.slow  # over a second: renders several figures
def test_explorer_slider_changes_plot_and_text(data_dir, monkeypatch):
    from cap_lab.widgets import Explorer

    calls = []
    monkeypatch.setattr(sweep, "evaluate", fake_evaluate(calls))
    ex = Explorer(TINY, data_dir=data_dir)
    ex.widget()
    text, image = ex.status.value, ex.image.value
    assert f"achieved sparsity {TINY.sparsities[0]:.2%}" in text and image[:4] == b"\x89PNG"
    ex.sparsity.value = 0.5
    assert "achieved sparsity 50.00%" in ex.status.value and ex.image.value != image
    ex.method.value = "wanda"
    assert ex.status.value.startswith("wanda at 50%")
    before = ex.context().lm.fingerprint
    ex.benchmark.value = "arc_challenge"
    rows = ex.quick_evaluate()
    assert [r["task"] for r in rows] == ["arc_challenge"] and ex.progress.value == ex.progress.max
    assert ex.context().lm.fingerprint == before  # dense again
    ex.benchmark.value = "wikitext2"
    assert [r["mode"] for r in ex.quick_evaluate()] == ["ppl"]
