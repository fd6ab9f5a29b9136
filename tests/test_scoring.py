from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cap_lab import store
from cap_lab.calibration import CalibrationConfig, build_calibration_set
from cap_lab.modeling import get_layout
from cap_lab.scoring import aggregate_scores, head_scores, score_heads_reference
from cap_lab.scoring.api import scores_root

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
        (Path(first.settings["path"]) / "tensors.safetensors").write_bytes(b"garbage")
        with pytest.warns(UserWarning, match="corrupt"):
            third = head_scores(tiny, calib, progress=False)
        assert len(calls) > n_first and torch.equal(third.scores, first.scores)
    finally:
        handle.remove()


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last float: still parses as safetensors
    path.write_bytes(bytes(data))


def _resave(first, **tensors) -> None:
    """Rewrite the entry with a valid checksum but other tensors (what a buggy writer could leave)."""
    store.save(scores_root(), first.settings["payload"], {"method": "exact"}, tensors=tensors)


@pytest.mark.parametrize("damage", ["flipped byte", "NaN losses", "wrong shape", "missing tensor file"])
def test_a_damaged_score_entry_is_reported_in_one_line_and_recomputed(tiny, calib, damage):
    first = head_scores(tiny, calib, progress=False)
    entry = Path(first.settings["path"])
    if damage == "flipped byte":
        _flip_a_byte(entry / "tensors.safetensors")
    elif damage == "NaN losses":
        _resave(first, masked_losses=torch.full_like(first.masked_losses, float("nan")),
                intact_losses=first.intact_losses)
    elif damage == "wrong shape":
        _resave(first, masked_losses=first.masked_losses[:, :2], intact_losses=first.intact_losses)
    else:
        (entry / "tensors.safetensors").unlink()
    with pytest.warns(UserWarning) as caught:
        again = head_scores(tiny, calib, progress=False)
    messages = [str(w.message) for w in caught if "cap_lab" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0] and str(entry) in messages[0]
    assert torch.equal(again.scores, first.scores) and torch.isfinite(again.masked_losses).all()
    assert torch.equal(head_scores(tiny, calib, progress=False).scores, first.scores)  # the entry was repaired


def test_a_changed_chat_template_is_a_new_score_entry(tiny, data_dir):
    """Same weights and settings, other tokens: the cache must not serve the old scores."""
    config = CalibrationConfig(n_per_task=2, n_subsets=2, max_length=32)
    before = head_scores(tiny, build_calibration_set(tiny.tokenizer, config, data_dir), progress=False)
    tiny.tokenizer.chat_template = tiny.tokenizer.chat_template.replace("<assistant>", "<bot>")
    calib = build_calibration_set(tiny.tokenizer, config, data_dir)
    after = head_scores(tiny, calib, progress=False)
    assert after.settings["key"] != before.settings["key"]
    assert not torch.allclose(after.scores, before.scores, atol=1e-3)  # stale scores would be visibly wrong
    torch.testing.assert_close(after.scores, score_heads_reference(tiny.model, calib, progress=False).scores,
                               atol=1e-5, rtol=0)


def test_cache_key_changes_with_settings(tiny, data_dir):
    a = build_calibration_set(tiny.tokenizer, CalibrationConfig(n_per_task=2, n_subsets=2, max_length=32), data_dir)
    b = build_calibration_set(tiny.tokenizer, CalibrationConfig(n_per_task=2, n_subsets=2, max_length=32, seed=1), data_dir)
    ka = head_scores(tiny, a, progress=False).settings["key"]
    kb = head_scores(tiny, b, progress=False).settings["key"]
    assert ka != kb


def test_bad_scoring_arguments(tiny, calib):
    with pytest.raises(ValueError, match="'fastest'"):
        head_scores(tiny, calib, method="fastest")
