"""MLP-neuron causal scores: attribution patching, exact ablation of a sample, the neuron hook."""
import copy

import pytest
import torch

from cap_lab.calibration import CalibrationConfig, build_calibration_set
from cap_lab.modeling import get_layout, mask_neurons
from cap_lab.scoring.neurons import (
    check_neuron_scores, neuron_ablation_losses, sample_neurons, score_neurons_attribution,
)
from cap_lab.scoring.types import aggregate_scores

from conftest import same_state, state_copy, subset_mean_target_losses


@pytest.fixture
def calib(tiny, data_dir):
    return build_calibration_set(tiny.tokenizer, CalibrationConfig(n_per_task=3, n_subsets=3, max_length=32), data_dir)


def test_attribution_is_minus_the_derivative_of_each_subset_loss_in_the_neuron_scale(tiny, calib, one_thread):
    """Delta_k(l, j) = -dL_k/d(alpha_j) at alpha = 1, alpha scaling layer l's down_proj inputs."""
    result = score_neurons_attribution(tiny.model, calib, batch_size=4, progress=False)
    got = result.masked_losses - result.intact_losses.view(-1, 1, 1)  # (K, L, I)
    assert got.shape == (3, 3, 48)
    torch.testing.assert_close(result.scores, aggregate_scores(result.masked_losses, result.intact_losses))
    for layer in (0, 2):
        alpha = torch.ones(48, requires_grad=True)
        with mask_neurons(tiny.model, {layer: alpha}):
            losses = subset_mean_target_losses(tiny.model, calib)  # (K,)
        want = torch.stack([-torch.autograd.grad(losses[k], alpha, retain_graph=True)[0] for k in range(3)])
        torch.testing.assert_close(got[:, layer], want.float(), atol=3e-6, rtol=0)
    with torch.no_grad():  # a finite difference of the true loss, for the sign convention
        moved = []
        for scale in (1.01, 0.99):
            mask = torch.ones(48)
            mask[5] = scale
            with mask_neurons(tiny.model, {1: mask}):
                moved.append(subset_mean_target_losses(tiny.model, calib))
    torch.testing.assert_close(got[:, 1, 5].double(), -(moved[0] - moved[1]) / 0.02, atol=5e-4, rtol=1e-2)
    assert all(p.grad is None for p in tiny.model.parameters())


def test_zeroing_a_neuron_at_the_down_proj_input_is_zeroing_its_down_proj_column(tiny, calib, one_thread):
    ids = torch.tensor([calib.items[0].input_ids])  # (1, S)
    mask = torch.ones(48)
    mask[[3, 17]] = 0.0
    with torch.no_grad(), mask_neurons(tiny.model, {1: mask}):
        hooked = tiny.model(input_ids=ids).logits
    reference = copy.deepcopy(tiny.model)
    with torch.no_grad():
        reference.model.layers[1].mlp.down_proj.weight[:, [3, 17]] = 0.0  # the obvious way, on a copy
        torch.testing.assert_close(hooked, reference(input_ids=ids).logits, atol=1e-6, rtol=0)


def test_exact_ablation_equals_the_obvious_masked_forward(tiny, calib, one_thread):
    neurons = torch.tensor([[0, 4], [0, 40], [1, 0], [2, 11], [2, 47]])
    masked, intact = neuron_ablation_losses(tiny.model, calib, neurons, batch_size=4, neurons_per_pass=2)
    assert masked.shape == (3, 5) and intact.shape == (3,)
    torch.testing.assert_close(intact, subset_mean_target_losses(tiny.model, calib), atol=1e-6, rtol=0)
    with torch.no_grad():
        for i, (layer, j) in enumerate(neurons.tolist()):
            mask = torch.ones(48)
            mask[j] = 0.0
            with mask_neurons(tiny.model, {layer: mask}):
                torch.testing.assert_close(masked[:, i], subset_mean_target_losses(tiny.model, calib), atol=1e-6, rtol=0)


def test_the_estimate_ranks_sampled_neurons_like_exact_ablation(tiny, calib, one_thread):
    scores = score_neurons_attribution(tiny.model, calib, batch_size=4, progress=False)
    check = check_neuron_scores(tiny.model, calib, scores, per_layer=8, seed=0, batch_size=4)
    assert check.neurons.shape == (24, 2) and check.exact.shape == check.estimated.shape == (24,)
    torch.testing.assert_close(check.intact_losses, scores.intact_losses, atol=1e-5, rtol=0)
    assert check.spearman > 0.8  # 0.98 with this seed; the second-order terms are what it misses


def test_in_a_nearly_linear_regime_the_estimate_is_the_exact_ablation(tiny, calib, one_thread):
    """With tiny down_proj weights every neuron is a small perturbation: first order is the whole story."""
    model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(1e-3)
    scores = score_neurons_attribution(model, calib, batch_size=4, progress=False)
    check = check_neuron_scores(model, calib, scores, per_layer=6, seed=1, batch_size=4)
    delta_exact = check.masked_losses - check.intact_losses.view(-1, 1)  # (K, n)
    delta_estimated = (scores.masked_losses - scores.intact_losses.view(-1, 1, 1))[:, check.neurons[:, 0],
                                                                                  check.neurons[:, 1]]
    scale = float(delta_exact.abs().max())
    assert scale > 0
    torch.testing.assert_close(delta_estimated.double(), delta_exact.double(), atol=0.02 * scale, rtol=0)


def test_neuron_scoring_leaves_weights_flags_grads_and_hooks_untouched(tiny, calib, one_thread):
    before = state_copy(tiny.model)
    flags = [p.requires_grad for p in tiny.model.parameters()]
    scores = score_neurons_attribution(tiny.model, calib, batch_size=4, progress=False)
    check_neuron_scores(tiny.model, calib, scores, per_layer=2, batch_size=4)
    assert same_state(before, state_copy(tiny.model))
    assert [p.requires_grad for p in tiny.model.parameters()] == flags
    assert all(p.grad is None for p in tiny.model.parameters())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in tiny.model.modules())
    with pytest.raises(ValueError, match=r"per-row neuron mask has 2 rows"):  # a failing forward removes its hooks too
        with torch.no_grad(), mask_neurons(tiny.model, {0: torch.ones(2, 48)}):
            tiny.model(input_ids=torch.tensor([[1, 5, 6]]))
    assert all(not m._forward_pre_hooks for m in tiny.model.modules())
    assert same_state(before, state_copy(tiny.model))


def test_sampling_and_bad_arguments(tiny, calib):
    a, b = sample_neurons(3, 48, 5, seed=2), sample_neurons(3, 48, 5, seed=2)
    assert torch.equal(a, b) and a.shape == (15, 2)
    assert a[:, 0].tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert all(len(set(a[a[:, 0] == l, 1].tolist())) == 5 for l in range(3))
    assert not torch.equal(a, sample_neurons(3, 48, 5, seed=3))
    with pytest.raises(ValueError, match=r"per_layer=49; must be in \[1, 48\]"):
        sample_neurons(3, 48, 49)
    with pytest.raises(ValueError, match=r"neuron \(3, 0\) does not exist"):
        neuron_ablation_losses(tiny.model, calib, torch.tensor([[3, 0]]))
    with pytest.raises(ValueError, match="neurons_per_pass=0"):
        neuron_ablation_losses(tiny.model, calib, torch.tensor([[0, 0]]), neurons_per_pass=0)
    with pytest.raises(ValueError, match="expected \\(I,\\) or \\(B, I\\), I=48"):
        with mask_neurons(tiny.model, {0: torch.ones(47)}):
            pass
    with pytest.raises(ValueError, match="aggregate='max'"):
        score_neurons_attribution(tiny.model, calib, aggregate="max")
    assert get_layout(tiny.model).hook_site(tiny.model, 2, "down_proj") is tiny.model.model.layers[2].mlp.down_proj
    with pytest.raises(ValueError, match="hook site 'q_proj'; allowed: o_proj, down_proj"):
        get_layout(tiny.model).hook_site(tiny.model, 0, "q_proj")
