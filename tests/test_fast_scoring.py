"""Fast exact scoring: equals the reference on every tiny family, resumes, fails loudly."""
from dataclasses import replace

import pytest
import torch

from cap_lab.calibration import CalibrationConfig, build_calibration_set
from cap_lab.modeling import get_layout
from cap_lab.models import TINY_ARCHS, tiny_random_model
from cap_lab.scoring import exact, head_scores, progress_dir, score_heads_reference, score_payload
from cap_lab.scoring.exact import head_groups, heads_per_pass, plan_chunks, score_heads_exact

from conftest import same_state, state_copy

LENGTHS = (20, 31, 26, 31, 17, 24)  # uneven on purpose: padding, several chunks


def varied_calibration(lm, data_dir, n_subsets=2):
    """A 6-item calibration set whose items are cut to uneven lengths (targets kept non-empty)."""
    calib = build_calibration_set(lm.tokenizer, CalibrationConfig(n_per_task=2, n_subsets=n_subsets, max_length=32), data_dir)
    items = tuple(replace(it, input_ids=it.input_ids[:n], target_start=min(it.target_start, n - 3))
                  for it, n in zip(calib.items, LENGTHS))
    return replace(calib, items=items)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_fast_equals_reference(arch, data_dir):
    lm = tiny_random_model(arch, seed=1)
    calib = varied_calibration(lm, data_dir)
    ref = score_heads_reference(lm.model, calib, batch_size=4, progress=False)
    fast = score_heads_exact(lm.model, calib, batch_size=3, max_padding=0.5, progress=False)
    assert fast.settings["chunks"] > 1 and fast.settings["padded_tokens"] > sum(LENGTHS)  # padding exercised
    torch.testing.assert_close(fast.intact_losses, ref.intact_losses, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.masked_losses, ref.masked_losses, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.scores, ref.scores, atol=1e-5, rtol=0)


def test_fast_equals_reference_with_eager_attention(data_dir):
    lm = tiny_random_model("gemma3", seed=3)  # float masks, sliding-window layers
    lm.model.set_attn_implementation("eager")
    calib = varied_calibration(lm, data_dir)
    ref = score_heads_reference(lm.model, calib, batch_size=4, progress=False)
    fast = score_heads_exact(lm.model, calib, batch_size=3, max_padding=0.5, progress=False)
    torch.testing.assert_close(fast.scores, ref.scores, atol=1e-5, rtol=0)


def test_one_head_per_pass_and_chunked_logits_change_nothing(data_dir):
    lm = tiny_random_model("gemma3", seed=2, final_logit_softcapping=3.0)  # soft-capped logits too
    calib = varied_calibration(lm, data_dir)
    ref = score_heads_reference(lm.model, calib, batch_size=6, progress=False)
    tight = score_heads_exact(lm.model, calib, batch_size=3, max_padding=0.5, memory_budget=1, progress=False)
    assert tight.settings["heads_per_pass"] == [1, 1]  # and one logit row at a time
    torch.testing.assert_close(tight.scores, ref.scores, atol=1e-5, rtol=0)


def test_plan_chunks_sorts_and_bounds_padding():
    assert plan_chunks([5, 9, 5, 10], batch_size=8, max_padding=0.1) == [[0, 2], [1, 3]]
    assert plan_chunks([5, 9, 5, 10], batch_size=8, max_padding=1.0) == [[0, 2, 1, 3]]
    assert plan_chunks([5, 5, 5], batch_size=2, max_padding=0.0) == [[0, 1], [2]]
    with pytest.raises(ValueError, match="batch_size=0"):
        plan_chunks([5], batch_size=0)


def test_head_groups_and_budget():
    assert head_groups(9, 9) == [list(range(9))]
    assert head_groups(9, 4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert head_groups(4, 1) == [[0], [1], [2], [3]]
    assert heads_per_pass(rows=2, width=10, bytes_per_token=100, num_heads=9, memory_budget=6000) == 3
    assert heads_per_pass(rows=2, width=10, bytes_per_token=100, num_heads=9, memory_budget=1) == 1
    assert heads_per_pass(rows=2, width=10, bytes_per_token=100, num_heads=9, memory_budget=10**9) == 9


def test_scoring_leaves_weights_and_hooks_untouched(tiny, data_dir):
    calib = varied_calibration(tiny, data_dir)
    before = state_copy(tiny.model)
    score_heads_exact(tiny.model, calib, progress=False)
    assert same_state(before, state_copy(tiny.model))
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in tiny.model.modules())


class _Interrupt(Exception):
    pass


def test_interrupted_run_resumes_from_the_last_finished_layer(tiny, data_dir, monkeypatch):
    calib = varied_calibration(tiny, data_dir)
    whole = score_heads_exact(tiny.model, calib, progress=False)
    real, scored = exact._score_layer, []

    def failing(model, layout, layer, *args):
        if layer == 2:
            raise _Interrupt
        scored.append(layer)
        return real(model, layout, layer, *args)

    monkeypatch.setattr(exact, "_score_layer", failing)
    with pytest.raises(_Interrupt):
        head_scores(tiny, calib, progress=False)
    folder = progress_dir(score_payload(tiny.identity(), calib, "exact"))
    assert sorted(p.name for p in folder.glob("layer_*")) == ["layer_0000.safetensors", "layer_0001.safetensors"]
    assert not list(folder.glob(".*.tmp"))  # atomic writes leave no temporaries

    def counting(model, layout, layer, *args):
        scored.append(layer)
        return real(model, layout, layer, *args)

    scored.clear()
    monkeypatch.setattr(exact, "_score_layer", counting)
    resumed = head_scores(tiny, calib, progress=False)
    assert scored == [2]  # layers 0 and 1 came from disk
    assert resumed.settings["resumed_layers"] == [0, 1]
    assert torch.equal(resumed.masked_losses, whole.masked_losses)
    assert torch.equal(resumed.scores, whole.scores)
    assert not folder.exists()  # progress is dropped once the cache entry is written


def test_progress_of_another_run_is_not_trusted(tiny, data_dir, tmp_path):
    calib = varied_calibration(tiny, data_dir)
    layout = get_layout(tiny.model)
    other = exact.LayerCheckpoints(tmp_path / "p", {"something": "else"})
    other.save(0, torch.full((layout.num_heads, len(calib.items)), 123.0, dtype=torch.float64))
    got = score_heads_exact(tiny.model, calib, checkpoint_dir=tmp_path / "p", progress=False)
    assert got.settings["resumed_layers"] == []
    assert torch.equal(got.scores, score_heads_exact(tiny.model, calib, progress=False).scores)
