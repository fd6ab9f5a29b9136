"""Each notebook's main path through the package API, on a tiny model and the small data dir.

The notebooks themselves run under nbval (``CAP_LAB_PROFILE=ci pytest --nbval-lax notebooks/``)
on the real model; these mirror them in seconds so a broken API shows up in the unit tests.
"""
from __future__ import annotations

from dataclasses import replace

import matplotlib

matplotlib.use("Agg")
import pytest
import torch

from cap_lab import ablation_plots, ablations, calibration, plotting, sweep, tables
from cap_lab.calibration import build_calibration_set
from cap_lab.config import get_profile, load_profile_model
from cap_lab.scoring import head_scores
from cap_lab.stability import stability_study
from cap_lab.widgets import Explorer
from conftest import write_data_dir

pytestmark = pytest.mark.slow  # a second or more each; the notebooks they mirror run under nbval in CI too

TINY = get_profile("tiny")


@pytest.fixture
def figures(tmp_path, monkeypatch):
    monkeypatch.setenv("CAP_LAB_FIGURES", str(tmp_path / "figures"))
    return tmp_path / "figures"


def _scores(lm, calib):
    return head_scores(lm, calib, method=TINY.score_method, batch_size=TINY.score_batch_size, progress=False)


def test_01_calibration(data_dir, figures):
    lm = load_profile_model("tiny-llama")
    calib = build_calibration_set(lm.tokenizer, TINY.calibration, data_dir)
    frame = calib.to_frame()
    assert len(frame) == TINY.calibration.n_per_task * 3
    assert frame.groupby("subset")["task"].nunique().eq(3).all()
    plotting.save_output(plotting.calibration_lengths(frame, model=lm.name, profile=TINY), "01_lengths.png", profile=TINY)
    before = lm.fingerprint
    hs = _scores(lm, calib)
    assert lm.fingerprint == before and hs.scores.shape == (3, 4) and hs.intact_losses.shape == (2,)
    plotting.save_output(plotting.intact_losses(hs, model=lm.name, profile=TINY), "01_intact.png", profile=TINY)
    assert set(plotting.read_manifest(figures)) == {"01_lengths.png", "01_intact.png"}


def test_02_head_importance(data_dir, figures):
    lm = load_profile_model("tiny-llama")
    calib = build_calibration_set(lm.tokenizer, TINY.calibration, data_dir)
    hs = _scores(lm, calib)
    other = _scores(lm, build_calibration_set(lm.tokenizer, replace(TINY.calibration, draw=1), data_dir))
    named = {f"subset {k}": s for k, s in enumerate(hs.per_subset())}
    named.update(draw0=hs.scores, draw1=other.scores, mean=hs.with_aggregate("mean").scores)
    corr = plotting.rank_correlations(named)
    assert corr.shape == (5, 5) and torch.allclose(torch.tensor(corr.values).diagonal(), torch.ones(5, dtype=torch.float64))
    assert plotting.top_heads(hs.scores, 3)["score"].iloc[0] == float(hs.scores.max())
    study = stability_study(lm, TINY.calibration, dict(TINY.stability), data_dir=data_dir, progress=False)
    assert list(zip(study["method"], study["n_per_task"])) == [("exact", 2), ("exact", 4), ("attribution", 2), ("attribution", 4)]
    # the profile's own set is draw 0 at its size: the study's last exact point reuses its scores
    assert study.iloc[1]["tokens_draw0"] == calib.n_tokens
    small = build_calibration_set(lm.tokenizer, TINY.comparison_calibration(), data_dir)
    assert TINY.comparison_calibration().n_per_task == 2 and len(small.items) == 6
    for name, fig in {"heat": plotting.head_heatmap(hs.scores, title="t", model=lm.name, profile=TINY),
                      "dist": plotting.score_distribution(hs.scores, model=lm.name, profile=TINY),
                      "stab": plotting.rank_stability(corr, model=lm.name, profile=TINY),
                      "study": plotting.stability_curve(study, model=lm.name, profile=TINY),
                      "mvm": plotting.median_vs_mean(hs.scores, hs.with_aggregate("mean").scores, model=lm.name, profile=TINY)}.items():
        plotting.save_output(fig, f"02_{name}.png", profile=TINY, model=lm.name)
    assert len(plotting.read_manifest(figures)) == 5


def test_03_and_04_sweep_table_and_perplexity_vs_accuracy(data_dir, figures, monkeypatch):
    result = sweep.run_sweep(TINY, "tiny-llama", data_dir=data_dir, progress=False)
    res = result.results()
    assert {"loglik", "cot", "ppl"} == set(res["mode"])
    assert set(res[res["mode"] == "loglik"]["task"]) == {"strategyqa", "arc_challenge"}
    table = tables.table1(res)
    assert list(table["method"][:4]) == ["Dense", "Magnitude", "Wanda", "CAP"] and len(table) == 1 + 3 * len(TINY.sparsities)
    cap = [r for r in result.records if r["method"] == "cap"]
    assert all(abs(r["achieved_sparsity"] - r["sparsity"]) <= 1e-4 + 1 / 48 for r in cap)
    per_cap_row = res[res["method"] == "cap"][["task", "mode"]].drop_duplicates().shape[0]
    assert len(tables.cap_vs_wanda(res)) == len(TINY.sparsities) * per_cap_row
    paired = tables.paired_differences(result.records, n_resamples=200)
    assert len(paired) == 3 * len(TINY.sparsities) * per_cap_row  # CAP-Wanda, CAP-dense, Wanda-dense
    assert tables.table1_long(res, paired).query("method == 'cap'")["delta_vs_wanda"].notna().all()
    times = result.wall_times()  # every stage of every cell, with the seconds it took when it ran
    stages = 1 + len(sweep.evaluation_units(TINY))  # prune (not for dense) and every evaluation unit
    assert len(times) == len(result.records) * stages - 1 and times["seconds"].ge(0).all()
    summary = tables.wall_time_summary(times)
    assert summary.loc[0, "total"] == pytest.approx(times["seconds"].sum() / 60)
    plotting.save_output(tables.markdown_table(table), "03_table.md", profile=TINY)
    plotting.save_output(plotting.accuracy_vs_sparsity(res, model="tiny-llama", profile=TINY), "03_curves.png", profile=TINY)
    plotting.save_output(plotting.layer_sparsity(result.layer_sparsity(), model="tiny-llama", sparsity=0.5, profile=TINY),
                         "03_layers.png", profile=TINY)

    # notebook 04 reads the same cells from the cache: no evaluation runs again
    monkeypatch.setattr(sweep, "evaluate", lambda *a, **k: pytest.fail("a cached cell was evaluated again"))
    again = sweep.run_sweep(TINY, "tiny-llama", data_dir=data_dir, progress=False).results()
    assert again.equals(res)
    plotting.save_output(plotting.perplexity_vs_accuracy(again, model="tiny-llama", profile=TINY), "04.png", profile=TINY)
    assert len(plotting.read_manifest(figures)) == 4


def test_05_explorer(data_dir):
    ex = Explorer(TINY, data_dir=data_dir)
    ex.widget()
    text, image = ex.status.value, ex.image.value
    ex.sparsity.value = next(s for _, s in ex.sparsity.options if s != ex.sparsity.value)
    assert ex.status.value != text and ex.image.value != image
    ex.benchmark.value = "strategyqa"
    rows = ex.quick_evaluate()
    assert rows[0]["task"] == "strategyqa" and rows[0]["n"] == ex.quick_limit and "accuracy" in ex.result.value


def test_06_ablations(tmp_path, figures, monkeypatch):
    data_dir = write_data_dir(tmp_path / "data")  # with a WikiText-2 text long enough for cap-wikitext2's windows
    (data_dir / "wikitext2_raw/wiki.test.raw").write_text("".join(f" Line {i} of the corpus has words . \n" for i in range(400)))
    monkeypatch.setattr(calibration, "WIKITEXT2_EVAL_TOKENS", 0)
    cells = ablations.ablation_cells(TINY)
    grid = ablations.run_ablations(TINY, "tiny-llama", data_dir=data_dir, progress=False)
    results, layers = grid.results(), grid.layer_sparsity()
    assert set(results["method"]) == {c.method for c in cells} and set(results["mode"]) == {"loglik", "ppl"}
    for r in grid.records:
        if r["nm"]:
            assert r["achieved_sparsity"] == 0.5, r["method"]  # 2 of every 4, exactly
        elif r["variant"] not in ("dense", "cap-heads"):
            assert abs(r["achieved_sparsity"] - r["sparsity"]) < 0.02, r["method"]
    paired = tables.paired_differences(grid.records, n_resamples=200, comparisons=ablations.comparisons(cells))
    assert set(paired["b"]) == {"wanda", "wanda 2:4", "dense"}
    answer = ablations.collapse_answer(results, paired)
    assert set(answer["variant"]) == {c.variant for c in cells if c.nm is None} - {"dense", "wanda"}
    top = max(TINY.ablation_sparsities)
    methods = [c.method for c in cells if c.nm is None and c.sparsity == top]
    for name, fig in {"overview": ablation_plots.ablation_overview(results, model="tiny-llama", profile=TINY),
                      "paired": ablation_plots.paired_vs_baseline(paired, model="tiny-llama", profile=TINY),
                      "layers": plotting.layer_sparsity(layers, model="tiny-llama", sparsity=top, profile=TINY, methods=methods)}.items():
        plotting.save_output(fig, f"06_{name}.png", profile=TINY)
    assert len(plotting.read_manifest(figures)) == 3
