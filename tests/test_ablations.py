"""The ablation grid of notebook 06 (cap_lab.ablations) on a tiny model with a stand-in evaluator."""
from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest

from cap_lab import ablations, sweep
from cap_lab.ablations import AblationCell, ablation_cells, collapse_answer, comparisons, get_variants, prune_settings
from cap_lab.config import ALL_VARIANTS, get_profile, load_profile_model
from cap_lab.tables import paired_differences
from conftest import fake_evaluate

TINY = get_profile("tiny")


def test_the_profile_names_are_the_variant_table():
    assert tuple(ablations.VARIANTS) == ALL_VARIANTS
    with pytest.raises(ValueError, match=r"unknown ablation variants \['cap-x'\]; allowed: magnitude"):
        get_variants(["cap", "cap-x"])


def test_cells_cover_every_variant_pattern_it_allows():
    cells = ablation_cells(TINY)
    assert cells[0] == AblationCell("dense", 0.0)
    nm_free = {"cap-heads", "cap-layer", "cap-row", "cap-activation-row"}
    expected = sum(len(TINY.ablation_sparsities) + (0 if v in nm_free else 1) for v in TINY.ablation_variants)
    assert len(cells) == 1 + expected
    assert AblationCell("cap-neuron", 0.5, (2, 4)).method == "cap-neuron 2:4"
    assert not [c for c in cells if c.variant in nm_free and c.nm]


def test_every_variant_is_compared_with_wanda_at_its_own_pattern_and_with_dense():
    cells = [AblationCell("dense", 0.0), AblationCell("wanda", 0.5), AblationCell("wanda", 0.5, (2, 4)),
             AblationCell("cap", 0.5), AblationCell("cap", 0.5, (2, 4))]
    assert comparisons(cells) == [("wanda", "dense"), ("wanda 2:4", "dense"), ("cap", "wanda"), ("cap", "dense"),
                                  ("cap 2:4", "wanda 2:4"), ("cap 2:4", "dense")]


def test_prune_settings_carry_the_variant_options_and_the_pattern():
    cfg = prune_settings(TINY, AblationCell("cap-neuron", 0.5, (2, 4)))
    assert (cfg.method, cfg.nm, cfg.sparsity, cfg.cap_mlp_factors) == ("cap", (2, 4), 0.5, "neuron")
    cfg = prune_settings(TINY, AblationCell("magnitude", 0.2))
    assert (cfg.method, cfg.magnitude_scope, cfg.sparsity, cfg.nm) == ("magnitude", TINY.magnitude_scope, 0.2, None)
    assert prune_settings(TINY, AblationCell("cap-layer", 0.1)).cap_scope == "layer"
    cfg = prune_settings(TINY, AblationCell("cap-activation-row", 0.2))
    assert (cfg.cap_scope, cfg.cap_activation, cfg.sparsity) == ("row", True, 0.2)


def test_a_grid_prunes_evaluates_stores_and_restores(data_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep, "evaluate", fake_evaluate(calls))
    lm = load_profile_model("tiny-llama")
    dense_print = lm.fingerprint
    cells = [AblationCell("dense", 0.0), AblationCell("wanda", 0.5), AblationCell("cap-neuron", 0.5, (2, 4)),
             AblationCell("cap-mean", 0.5), AblationCell("cap-k2", 0.5)]
    grid = ablations.run_ablations(TINY, lm, data_dir=data_dir, cells=cells, progress=False)
    assert lm.fingerprint == dense_print
    assert [r["method"] for r in grid.records] == ["dense", "wanda", "cap-neuron 2:4", "cap-mean", "cap-k2"]
    assert grid.records[2]["achieved_sparsity"] == 0.5 and grid.records[2]["nm"] == [2, 4]  # exactly 2 of every 4
    assert all(abs(r["achieved_sparsity"] - 0.5) < 0.02 for r in grid.records[1:])
    assert {row["mode"] for row in grid.records[0]["rows"]} == {"loglik", "ppl"}  # no chain-of-thought
    n = len(calls)
    again = ablations.run_ablations(TINY, lm, data_dir=data_dir, cells=cells, progress=False)
    assert len(calls) == n and again.records == grid.records  # every cell came from the store
    paired = paired_differences(grid.records, n_resamples=200, comparisons=comparisons(cells))
    assert set(paired["a"]) == {"wanda", "cap-neuron 2:4", "cap-mean", "cap-k2"}


def test_the_cpu_grid_is_committed_and_the_tiny_grid_is_cached():
    cpu = get_profile("cpu")
    assert ablations.ablation_root(cpu) == ablations.repo_root() / "results" / "cpu-ablations"
    assert ablations.ablation_root(TINY) == sweep.cache_root() / "ablations"
    assert cpu.ablation_variants == ALL_VARIANTS and cpu.ablation_sparsities == (0.1, 0.2, 0.5)
    assert cpu.ablation_nm == ((2, 4),)


def test_collapse_answer_asks_for_both_conditions():
    results = pd.DataFrame(dict(
        method=["wanda", "cap", "cap-x", "cap 2:4"], sparsity=[0.5, 0.5, 0.5, 0.5], mode=["ppl"] * 4,
        task=["wikitext2"] * 4, value=[100.0, 400.0, 120.0, 999.0]))
    paired = pd.DataFrame(dict(a=["cap", "cap-x", "cap-x"], b=["wanda"] * 3, sparsity=[0.2, 0.2, 0.1],
                               task=["arc_challenge", "arc_challenge", "wikitext2"], mode=["loglik", "loglik", "ppl"],
                               delta=[0.01, -0.01, 0.05], ci_low=[-0.05, -0.06, 0.01], ci_high=[0.07, 0.04, 0.09]))
    answer = collapse_answer(pd.concat([results, results.assign(sparsity=0.2, value=10.0)]), paired).set_index("variant")
    assert answer.loc["cap", "ratio"] == 4.0 and not answer.loc["cap", "keeps_top"] and answer.loc["cap", "level_at_low"]
    assert answer.loc["cap-x", "keeps_top"] and answer.loc["cap-x", "worse_at_low"] == "wikitext2@10%"
    assert not answer["answers"].any() and "cap 2:4" not in answer.index
    assert collapse_answer(results, paired.iloc[:2]).set_index("variant").loc["cap-x", "answers"]
