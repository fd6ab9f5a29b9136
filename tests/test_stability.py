"""Disjoint calibration draws and the head-score stability study (cap_lab.stability)."""
from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest

from cap_lab.calibration import CalibrationConfig, build_calibration_set, draw_pool
from cap_lab.config import get_profile
from cap_lab.data import calibration_pool
from cap_lab.stability import STABILITY_COLUMNS, draw_configs, smallest_stable_size, stability_study

BASE = CalibrationConfig(n_per_task=4, n_subsets=2, max_length=64)


def test_the_two_halves_of_a_pool_are_disjoint_and_cover_it(data_dir):
    for task in ("gsm8k", "strategyqa", "arc_challenge"):
        pool = calibration_pool(task, data_dir)
        halves = [draw_pool(pool, task, d) for d in (0, 1)]
        uids = [{e.uid for e in h} for h in halves]
        assert not uids[0] & uids[1]
        assert uids[0] | uids[1] == {e.uid for e in pool}
        assert abs(len(halves[0]) - len(halves[1])) <= 1
        assert draw_pool(pool, task, None) is pool


def test_draws_never_share_an_example_whatever_their_seeds_and_sizes(tiny, data_dir):
    a = build_calibration_set(tiny.tokenizer, replace(BASE, draw=0, seed=0), data_dir)
    b = build_calibration_set(tiny.tokenizer, replace(BASE, draw=1, seed=0, n_per_task=6), data_dir)
    c = build_calibration_set(tiny.tokenizer, replace(BASE, draw=1, seed=5), data_dir)
    draw0 = {it.example.uid for it in a.items}
    assert not draw0 & {it.example.uid for it in b.items} and not draw0 & {it.example.uid for it in c.items}
    assert len(a.items) == 12 and len(b.items) == 18


def test_the_whole_pool_keeps_its_settings_key_and_a_draw_changes_it():
    assert "draw" not in BASE.to_dict()
    assert replace(BASE, draw=1).to_dict()["draw"] == 1


@pytest.mark.parametrize("bad", [2, -1, "0", 0.0])
def test_a_bad_draw_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match=r"draw=.*allowed: None"):
        replace(BASE, draw=bad)


def test_draw_configs_change_only_the_size_and_draw():
    a, b = draw_configs(BASE, 8)
    assert (a.draw, b.draw, a.n_per_task, b.n_per_task) == (0, 1, 8, 8)
    assert replace(a, draw=None, n_per_task=4) == BASE


def test_the_study_compares_two_disjoint_draws_per_size(tiny, data_dir):
    study = stability_study(tiny, BASE, {"attribution": [2, 4]}, data_dir=data_dir, progress=False)
    assert list(study.columns) == STABILITY_COLUMNS
    assert list(study["n_per_task"]) == [2, 4] and set(study["method"]) == {"attribution"}
    assert study["spearman"].between(-1, 1).all() and study["top_overlap"].between(0, 1).all()
    assert study["pruned_differently"].between(0, 1).all() and (study["sparsity"] == 0.2).all()


def test_smallest_stable_size_needs_every_model_to_reach_the_threshold():
    study = pd.DataFrame(dict(model=["a", "a", "a", "b", "b", "b"], method=["attribution"] * 6,
                              n_per_task=[8, 32, 128] * 2, spearman=[0.5, 0.85, 0.9, 0.4, 0.7, 0.95]))
    assert smallest_stable_size(study, "attribution", 0.8) == 128
    assert smallest_stable_size(study, "attribution", 0.6) == 32
    assert smallest_stable_size(study, "attribution", 0.99) is None
    with pytest.raises(ValueError, match="no rows of method 'exact'"):
        smallest_stable_size(study, "exact")


def test_the_comparison_set_is_draw_0_at_the_smallest_common_study_size():
    full = get_profile("cpu-full")  # attribution at 3-128 per task, exact at 3
    small = full.comparison_calibration()
    assert (small.n_per_task, small.draw) == (3, 0) and full.compare_scoring == ("exact",)
    assert replace(full, compare_scoring=("reference",)).comparison_calibration() == full.calibration
    cpu = get_profile("cpu")
    with pytest.raises(ValueError, match="stability scorers"):
        replace(cpu, stability=(("bogus", (3,)),))
