import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cap_lab import cache
from cap_lab.modeling import get_layout
from cap_lab.calibration import CalibrationConfig, build_calibration_set
from cap_lab.scoring import aggregate_scores, head_scores, score_heads_reference

from conftest import same_state, state_copy


@pytest.fixture
def calib(tiny, data_dir):
    return build_calibration_set(tiny.tokenizer, CalibrationConfig(n_per_task=3, n_subsets=3, max_length=48), data_dir)


def _direct_subset_loss(model, items) -> float:
    """Token-level mean target CE over the items, one example at a time."""
    total, count = 0.0, 0
    for it in items:
        ids = torch.tensor([it.input_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        for t in range(it.target_start, len(it.input_ids)):
            total += float(F.cross_entropy(logits[t - 1], ids[0, t]))
            count += 1
    return total / count


def test_scores_equal_a_from_scratch_computation_of_eq_1_2(tiny, calib, one_thread):
    layout = get_layout(tiny.model)
    got = score_heads_reference(tiny.model, calib, batch_size=4, progress=False)
    assert got.scores.shape == (layout.num_layers, layout.num_heads)
    subsets = [[it for it in calib.items if it.subset == k] for k in range(3)]
    intact = np.mean([_direct_subset_loss(tiny.model, s) for s in subsets])
    d = layout.head_dim
    for l, h in ((0, 0), (1, 2), (2, 3)):  # one head per layer, computed from scratch
        w = layout.o_proj(tiny.model, l).weight
        saved = w[:, h * d:(h + 1) * d].clone()
        with torch.no_grad():
            w[:, h * d:(h + 1) * d] = 0
        want = np.median([_direct_subset_loss(tiny.model, s) for s in subsets]) - intact
        with torch.no_grad():
            w[:, h * d:(h + 1) * d] = saved
        assert float(got.scores[l, h]) == pytest.approx(want, abs=2e-5), (l, h)


def test_scoring_leaves_weights_bit_identical(tiny, calib):
    before = state_copy(tiny.model)
    score_heads_reference(tiny.model, calib, batch_size=2, progress=False)
    assert same_state(before, state_copy(tiny.model))
    assert all(not m._forward_pre_hooks for m in tiny.model.modules())


def test_aggregate_median_and_mean():
    masked = torch.tensor([1.0, 2.0, 10.0, 3.0]).view(4, 1, 1)
    intact = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert float(aggregate_scores(masked, intact, "median")) == pytest.approx(1.5)  # (2 + 3) / 2 - 1
    assert float(aggregate_scores(masked, intact, "mean")) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="'max'"):
        aggregate_scores(masked, intact, "max")


def test_cache_hit_skips_the_model_and_corrupt_entries_are_recomputed(tiny, calib):
    calls = []
    handle = tiny.model.register_forward_pre_hook(lambda *a: calls.append(1))  # the fast path stops before lm_head
    try:
        first = head_scores(tiny, calib, progress=False)
        n_first = len(calls)
        assert n_first > 0
        second = head_scores(tiny, calib, progress=False)
        assert len(calls) == n_first  # no forward on a hit
        assert torch.equal(first.scores, second.scores)
        mean = head_scores(tiny, calib, aggregate="mean", progress=False)
        assert len(calls) == n_first and not torch.equal(mean.scores, first.scores)
        (cache.entry_dir("scores", first.settings["payload"]) / "tensors.safetensors").write_bytes(b"garbage")
        with pytest.warns(UserWarning, match="corrupt"):
            third = head_scores(tiny, calib, progress=False)
        assert len(calls) > n_first and torch.equal(third.scores, first.scores)
    finally:
        handle.remove()


def test_cache_key_changes_with_settings(tiny, data_dir):
    a = build_calibration_set(tiny.tokenizer, CalibrationConfig(n_per_task=2, n_subsets=2, max_length=32), data_dir)
    b = build_calibration_set(tiny.tokenizer, CalibrationConfig(n_per_task=2, n_subsets=2, max_length=32, seed=1), data_dir)
    ka = head_scores(tiny, a, progress=False).settings["key"]
    kb = head_scores(tiny, b, progress=False).settings["key"]
    assert ka != kb


def test_bad_scoring_arguments(tiny, calib):
    with pytest.raises(ValueError, match="'fastest'"):
        head_scores(tiny, calib, method="fastest")
