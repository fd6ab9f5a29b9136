"""Attribution patching, the agreement report, and the default method everywhere."""
import copy

import pytest
import torch

from cap_lab.modeling import get_layout
from cap_lab.scoring.attribution import score_heads_attribution
from cap_lab.calibration import CalibrationConfig, build_calibration_set
from cap_lab.cli import build_parser
from cap_lab.modeling import mask_heads
from cap_lab.pruning import PruneConfig, prune_model
from cap_lab.scoring import compare_scores, head_scores

from conftest import same_state, state_copy, subset_mean_target_losses


@pytest.fixture
def calib(tiny, data_dir):
    return build_calibration_set(tiny.tokenizer, CalibrationConfig(n_per_task=3, n_subsets=3, max_length=32), data_dir)


def test_attribution_is_minus_the_derivative_of_each_subset_loss_in_the_head_scale(tiny, calib):
    """Delta_k(l, h) = -dL_k/d(alpha_h) at alpha = 1, alpha scaling the heads of layer l before o_proj."""
    got = score_heads_attribution(tiny.model, calib, batch_size=4, progress=False).per_subset()  # (K, L, H)
    for layer in (0, 2):
        alpha = torch.ones(4, requires_grad=True)
        with mask_heads(tiny.model, {layer: alpha}):
            losses = subset_mean_target_losses(tiny.model, calib)  # (K,)
        want = torch.stack([-torch.autograd.grad(losses[k], alpha, retain_graph=True)[0] for k in range(3)])
        torch.testing.assert_close(got[:, layer], want, atol=3e-6, rtol=0)
    with torch.no_grad():  # and a finite difference of the true masked loss, for the sign convention
        moved = []
        for scale in (1.01, 0.99):
            with mask_heads(tiny.model, {2: torch.tensor([1.0, 1.0, 1.0, scale])}):
                moved.append(subset_mean_target_losses(tiny.model, calib))
    torch.testing.assert_close(got[:, 2, 3].double(), -(moved[0] - moved[1]) / 0.02, atol=5e-4, rtol=1e-2)
    assert all(p.grad is None for p in tiny.model.parameters())


def test_attribution_leaves_weights_flags_and_grads_untouched(tiny, calib):
    before = state_copy(tiny.model)
    flags = [p.requires_grad for p in tiny.model.parameters()]
    result = score_heads_attribution(tiny.model, calib, batch_size=4, progress=False)
    assert same_state(before, state_copy(tiny.model))
    assert [p.requires_grad for p in tiny.model.parameters()] == flags
    assert all(p.grad is None for p in tiny.model.parameters())
    assert all(not m._forward_pre_hooks for m in tiny.model.modules())
    assert result.scores.shape == (3, 4) and torch.isfinite(result.scores).all()
    torch.testing.assert_close(result.intact_losses, head_scores(tiny, calib, progress=False).intact_losses)


def test_compare_identical_reversed_and_different_scores(tiny):
    layout = get_layout(tiny.model)
    a = torch.arange(12, dtype=torch.float32).view(3, 4)
    same = compare_scores(a, a.clone(), tiny.model)
    assert same.spearman == pytest.approx(1) and same.kendall == pytest.approx(1)
    assert same.top_overlap == 1 and same.top_k == 1 and same.pruned_differently == 0
    rev = compare_scores(a, -a)
    assert rev.spearman == pytest.approx(-1) and rev.top_overlap == 0 and rev.pruned_differently is None

    before = state_copy(tiny.model)
    b = a.flip(0)
    got = compare_scores(a, b, tiny.model, sparsity=0.2).pruned_differently
    assert same_state(before, state_copy(tiny.model))  # masks only, never applied
    zeros = []
    for scores in (a, b):  # the direct way: prune copies and compare their zeros
        m = copy.deepcopy(tiny.model)
        prune_model(m, PruneConfig(method="cap", sparsity=0.2), head_scores=scores, progress=False)
        zeros.append([w.weight == 0 for _, _, w in layout.linear_weights(m)])
    total = sum(z.numel() for z in zeros[0])
    assert got == pytest.approx(sum(int((x ^ y).sum()) for x, y in zip(*zeros)) / total)
    assert 0 < got < 0.4


def test_compare_rejects_bad_input():
    with pytest.raises(ValueError, match="shapes differ"):
        compare_scores(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="NaN"):
        compare_scores(torch.full((2, 2), float("nan")), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="top_fraction=0"):
        compare_scores(torch.rand(2, 2), torch.rand(2, 2), top_fraction=0)


def test_exact_is_the_default_and_each_method_has_its_own_cache_entry(tiny, calib):
    default = head_scores(tiny, calib, progress=False)
    assert default.settings["method"] == "exact" and default.settings["payload"]["method"] == "exact"
    approx = head_scores(tiny, calib, method="attribution", progress=False)
    assert approx.settings["key"] != default.settings["key"]
    assert torch.equal(head_scores(tiny, calib, method="attribution", progress=False).scores, approx.scores)
    assert build_parser().parse_args(["score"]).method == "exact"
