"""The fast exact scorer on the real default model and real data (slow; runs in CI).

The reference over all 270 heads of the default model takes tens of minutes on a CPU, so the
comparison runs on 9 heads spread over three layers (first, middle, last): the fast path's
per-layer step (``masked_loss_sums`` on stacked copies, after advancing the kept hidden states
through the layers before it, exactly as :func:`score_heads_exact` does) against one masked full
forward each. The benchmark (``benchmarks/bench_scoring.py``) compares all heads.
"""
import os

import pytest
import torch

from cap_lab.calibration import CalibrationConfig, build_calibration_set, make_batch
from cap_lab.modeling import TargetTokens, call_layer, capture, get_layout, mask_heads, model_device
from cap_lab.models import DEFAULT_MODEL, load_model
from cap_lab.scoring import exact
from cap_lab.scoring.attribution import score_heads_attribution
from cap_lab.scoring.reference import item_loss_sums

from conftest import same_state, state_copy

pytestmark = pytest.mark.slow

HEADS = {0: (0, 4, 8), 13: (1, 5, 7), 29: (2, 3, 6)}  # layer: heads compared with the reference


@pytest.fixture(scope="module")
def real():
    if not os.environ.get("CAP_LAB_DATA"):
        pytest.skip("CAP_LAB_DATA is not set")
    lm = load_model(DEFAULT_MODEL, device="cpu")
    calib = build_calibration_set(lm.tokenizer, CalibrationConfig(n_per_task=2, n_subsets=2, max_length=64))
    return lm, calib


@torch.inference_mode()
def test_fast_per_layer_losses_equal_masked_full_forwards_on_the_default_model(real):
    lm, calib = real
    model, layout = lm.model, get_layout(lm.model)
    assert max(HEADS) == layout.num_layers - 1
    before = state_copy(model)
    n = len(calib.items)
    states = []
    for chunk in exact.plan_chunks([len(it.input_ids) for it in calib.items], 8):
        batch = make_batch([calib.items[i] for i in chunk], tuple(chunk), calib.pad_token_id, model_device(model))
        captured = capture(model, layout, batch.input_ids, batch.attention_mask)
        states.append(exact.ChunkState(batch, TargetTokens.from_labels(batch.labels), captured.hidden,
                                       captured.layer_kwargs, 3))
    fast = {}
    for layer in range(layout.num_layers):
        if layer in HEADS:  # what _score_layer does, for the compared heads only
            fast[layer] = torch.zeros(layout.num_heads, n, dtype=torch.float64)
            for state in states:
                sums = exact.masked_loss_sums(model, layout, layer, state, list(HEADS[layer]), 4096)  # (3, B)
                fast[layer][torch.tensor(HEADS[layer]).unsqueeze(1), torch.tensor(state.batch.items)] = sums
        for state in states:
            state.hidden = call_layer(layout.layers(model)[layer], state.hidden, state.layer_kwargs[layer])
    _, counts = item_loss_sums(model, calib)
    for layer, heads in HEADS.items():
        for head in heads:
            mask = torch.ones(layout.num_heads)
            mask[head] = 0
            with mask_heads(model, {layer: mask}):
                want, _ = item_loss_sums(model, calib)
            # per-item mean target loss, the quantity Eq. 1 averages
            torch.testing.assert_close(fast[layer][head] / counts, want / counts, atol=1e-4, rtol=0)
    assert same_state(before, state_copy(model))


def test_attribution_on_the_default_model_leaves_it_untouched(real):
    lm, calib = real
    before = state_copy(lm.model)
    result = score_heads_attribution(lm.model, calib, progress=False)
    assert result.scores.shape == (30, 9) and torch.isfinite(result.scores).all()
    assert same_state(before, state_copy(lm.model))
    assert all(p.grad is None for p in lm.model.parameters())
