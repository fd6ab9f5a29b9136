"""N:M semi-structured sparsity (cap_lab.selection) and OWL layer-wise allocation (cap_lab.sparsity_allocation)."""
import pytest
import torch

from cap_lab.calibration import CalibrationConfig, build_calibration_set
from cap_lab.modeling import capture_inputs, get_layout
from cap_lab.models import TINY_ARCHS, tiny_random_model
from cap_lab.pruning import apply_pruning_masks, cap_score_fn, magnitude_score_fn, random_score_fn
from cap_lab.selection import check_nm, nm_group_nonzeros, nm_prune_mask, nm_sparsity, select_masks
from cap_lab.sparsity_allocation import (
    add_token_sq_sums, input_sq_sums, layer_outlier_ratios, outlier_ratio, owl_allocation, owl_layer_sparsities,
)

from conftest import state_copy


def small_calib(lm, data_dir, n=2):
    return build_calibration_set(lm.tokenizer, CalibrationConfig(n_per_task=n, n_subsets=2, max_length=32), data_dir)


def assert_exact_nm(model, nm):
    """Exactly N non-zeros in every group of M consecutive inputs of every prunable matrix."""
    n, m = nm
    for l, name, mod in get_layout(model).linear_weights(model):
        counts = nm_group_nonzeros(mod.weight, m)  # (out, in/M)
        assert bool((counts == n).all()), (l, name, counts.unique().tolist())


# ------------------------------------------------------------------ N:M selection
def test_nm_mask_keeps_the_n_highest_of_every_group():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.7, 0.1, 0.9]])
    assert nm_prune_mask(score, 2, 4).tolist() == [[False, True, False, True, True, False, True, False]]
    assert nm_prune_mask(score, 1, 4).tolist() == [[False, True, True, True, True, True, True, False]]
    ties = torch.ones(1, 4)  # a stable sort: the earlier columns go first
    assert nm_prune_mask(ties, 2, 4).tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_equals_an_obvious_loop(nm):
    n, m = nm
    score = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    mask = nm_prune_mask(score, n, m)
    for row in range(5):
        for g in range(0, 16, m):
            group = score[row, g:g + m].tolist()
            keep = sorted(range(m), key=lambda j: group[j], reverse=True)[:n]
            assert [not mask[row, g + j].item() for j in range(m)] == [j in keep for j in range(m)]


@pytest.mark.parametrize("nm, needle", [((0, 4), r"\(0, 4\)"), ((4, 4), r"\(4, 4\)"), ((2.0, 4), r"\(2.0, 4\)"),
                                        ("2:4", "'2:4'")])
def test_bad_nm_patterns(nm, needle):
    with pytest.raises(ValueError, match=needle):
        check_nm(nm)


def test_nm_needs_inputs_divisible_by_m_and_prunes_nothing_otherwise():
    lm = tiny_random_model("llama", intermediate_size=44)  # down_proj has 44 inputs: 4 | 44, 8 does not
    layout = get_layout(lm.model)
    before = state_copy(lm.model)
    with pytest.raises(ValueError, match=r"layer 0 down_proj has shape \(32, 44\).*M=8|M=8.*layer 0 down_proj has shape \(32, 44\)"):
        apply_pruning_masks(select_masks(magnitude_score_fn, layout.linear_weights(lm.model), 0.5, nm=(4, 8))[0])
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match=r"\(3, 6\)"):
        nm_prune_mask(torch.zeros(3, 6), 2, 4)
    assert nm_sparsity((2, 4)) == 0.5 and nm_sparsity((4, 8)) == 0.5 and nm_sparsity((1, 4)) == 0.75


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_pattern_holds_for_score_methods(arch, nm):
    lm = tiny_random_model(arch)
    layout = get_layout(lm.model)
    targets = layout.linear_weights(lm.model)
    heads = torch.rand(layout.num_layers, layout.num_heads, generator=torch.Generator().manual_seed(0))
    for fn in (magnitude_score_fn, random_score_fn(0), cap_score_fn(heads, layout)):
        model = tiny_random_model(arch).model
        masks, threshold = select_masks(fn, get_layout(model).linear_weights(model), 0.2, nm=nm)
        selected = apply_pruning_masks(masks)
        assert threshold is None and selected == sum(m.weight.numel() for *_, m in targets) * nm_sparsity(nm)
        assert_exact_nm(model, nm)


def test_cap_nm_keeps_the_highest_cap_scores_per_group():
    lm = tiny_random_model("gemma3")
    layout = get_layout(lm.model)
    heads = torch.randn(layout.num_layers, layout.num_heads, generator=torch.Generator().manual_seed(2))
    fn = cap_score_fn(heads, layout)
    dense = {(l, n): fn(l, n, m.weight) for l, n, m in layout.linear_weights(lm.model)}
    apply_pruning_masks(select_masks(fn, layout.linear_weights(lm.model), 0.0, nm=(2, 4))[0])
    for (l, n, m) in layout.linear_weights(lm.model):
        score = dense[(l, n)]
        for row in range(0, score.shape[0], 7):
            for g in range(0, score.shape[1], 4):
                kept = set((m.weight[row, g:g + 4] != 0).nonzero().squeeze(1).tolist())
                best = set(torch.topk(score[row, g:g + 4], 2).indices.tolist())
                assert kept == best, (l, n, row, g)


def test_cap_nm_equals_magnitude_nm_when_m_divides_head_dim():
    """Eq. 4's factor is constant along a row (q/k/v, MLP) or within a head's columns (o_proj),
    so inside one group of M consecutive inputs CAP ranks exactly as |W| does."""
    a, b = tiny_random_model("llama"), tiny_random_model("llama")
    layout = get_layout(a.model)
    heads = torch.randn(layout.num_layers, layout.num_heads, generator=torch.Generator().manual_seed(3))
    apply_pruning_masks(select_masks(cap_score_fn(heads, layout), layout.linear_weights(a.model), 0.0, nm=(2, 4))[0])
    apply_pruning_masks(select_masks(magnitude_score_fn, layout.linear_weights(b.model), 0.0, nm=(2, 4))[0])
    for (_, n, x), (_, _, y) in zip(layout.linear_weights(a.model), layout.linear_weights(b.model)):
        assert torch.equal(x.weight == 0, y.weight == 0), n


# ------------------------------------------------------------------ OWL allocation (pure)
@pytest.mark.parametrize("ratios", [[0.0, 1.0, 2.0, 3.0, 4.0], [10.0, 0.0, 0.0, 0.0], [0.3, 5.0, 0.1, 2.2, 2.2, 7.5],
                                    [1.0, 1.0, 1.0]])
@pytest.mark.parametrize("target, lam", [(0.5, 0.08), (0.2, 0.15), (0.05, 0.1), (0.7, 0.2)])
def test_owl_ratios_average_to_the_target_within_the_bound(ratios, target, lam):
    s = owl_layer_sparsities(ratios, target, lam)
    assert float(s.mean()) == pytest.approx(target, abs=1e-12)
    assert bool((s >= max(0.0, target - lam) - 1e-12).all()) and bool((s <= target + lam + 1e-12).all())
    order = torch.argsort(torch.tensor(ratios), stable=True)  # more outliers -> lower (or equal) sparsity
    assert bool((s[order][1:] <= s[order][:-1] + 1e-12).all())


def test_owl_equals_the_authors_mapping_when_it_is_within_the_bound():
    d = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)  # evenly spread: mean of scaled D = lambda
    target, lam = 0.5, 0.08
    scaled = (d - d.min()) / (d.max() - d.min()) * 2 * lam
    reference = 1 - (scaled - scaled.mean() + (1 - target))  # the authors' density, turned into sparsity
    torch.testing.assert_close(owl_layer_sparsities(d, target, lam), reference, rtol=0, atol=1e-12)
    assert owl_layer_sparsities([10.0, 0.0, 0.0, 0.0], 0.5, 0.08)[0] == pytest.approx(0.42)  # authors: 0.38


def test_owl_weighted_mean_and_degenerate_cases():
    s = owl_layer_sparsities([3.0, 1.0, 0.0], 0.4, 0.1, weights=[1.0, 2.0, 5.0])
    assert float((s * torch.tensor([1.0, 2.0, 5.0])).sum() / 8) == pytest.approx(0.4, abs=1e-12)
    assert owl_layer_sparsities([1.0, 5.0], 0.3, 0.0).tolist() == [0.3, 0.3]


@pytest.mark.parametrize("args, needle", [
    (([0.1, float("nan")], 0.5, 0.1), "nan"), (([0.1, -1.0], 0.5, 0.1), "-1.0"), (([], 0.5, 0.1), r"\[\]"),
    (([0.1, 0.2], 1.0, 0.1), "sparsity=1.0"), (([0.1, 0.2], 0.95, 0.1), "owl_lambda=0.1"),
    (([0.1, 0.2], 0.5, -0.1), "owl_lambda=-0.1"),
])
def test_bad_owl_inputs(args, needle):
    with pytest.raises(ValueError, match=needle):
        owl_layer_sparsities(*args)


def test_outlier_ratio_on_hand_made_scores():
    scores = [torch.tensor([[1.0, 1.0, 1.0, 1.0]]), torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 31.0]])]  # mean 4
    assert outlier_ratio(scores, 5.0) == pytest.approx(0.1)  # 31 > 20: one of ten
    assert outlier_ratio(scores, 8.0) == 0.0
    with pytest.raises(ValueError, match="owl_m=0"):
        outlier_ratio(scores, 0)


# ------------------------------------------------------------------ OWL measured on a model
def test_input_sq_sums_equal_a_direct_computation(data_dir):
    lm = tiny_random_model("qwen2", num_hidden_layers=2)
    layout = get_layout(lm.model)
    calib = small_calib(lm, data_dir)
    sums = input_sq_sums(lm.model, layout, calib, batch_size=3)
    mods = {f"{l}.{n}": m for l, n, m in layout.linear_weights(lm.model)}
    direct = {k: torch.zeros(m.in_features, dtype=torch.float64) for k, m in mods.items()}
    with torch.no_grad():
        for b in calib.batches(list(range(len(calib.items))), 5):  # other batches, same tokens
            with capture_inputs(mods, lambda k, x: direct[k].add_((x[b.attention_mask.bool()].double() ** 2).sum(0))):
                lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    for (l, n), s in sums.items():
        torch.testing.assert_close(s, direct[f"{l}.{n}"], rtol=1e-5, atol=1e-6)
    total = torch.zeros(2, dtype=torch.float64)
    add_token_sq_sums(total, torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), torch.tensor([[1, 0]]))
    assert total.tolist() == [1.0, 4.0]


def test_owl_on_a_tiny_model_hits_the_target_layer_by_layer(data_dir):
    lm = tiny_random_model("llama", num_hidden_layers=4)
    layout = get_layout(lm.model)
    with torch.no_grad():  # make layer 2 outlier-heavy: a few inputs with large weights
        for _, _, m in [t for t in layout.linear_weights(lm.model) if t[0] == 2]:
            m.weight[:, :2] *= 40
    before = state_copy(lm.model)
    alloc = owl_allocation(lm.model, layout, small_calib(lm, data_dir), 0.5, lam=0.1, m=5.0, batch_size=4)
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())  # measuring changes nothing
    assert int(torch.argmax(alloc.outlier_ratios)) == 2 and int(torch.argmin(alloc.layer_sparsity)) == 2
    assert alloc.to_dict()["layer_sparsity"] == alloc.layer_sparsity.tolist()
    targets = layout.linear_weights(lm.model)
    apply_pruning_masks(select_masks(magnitude_score_fn, targets, 0.5, scope="matrix", layer_sparsity=alloc.layer_sparsity)[0])
    zeros, numel = torch.zeros(4), torch.zeros(4)
    for l, _, m in targets:
        zeros[l] += int((m.weight == 0).sum())
        numel[l] += m.weight.numel()
    achieved = zeros / numel  # every layer has the same numel: plain mean = numel-weighted mean
    assert torch.allclose(achieved.double(), alloc.layer_sparsity, atol=2e-3)
    assert float(zeros.sum() / numel.sum()) == pytest.approx(0.5, abs=1e-3)


def test_owl_per_layer_threshold_prunes_each_layers_exact_share():
    lm = tiny_random_model("mistral")
    layout = get_layout(lm.model)
    targets = layout.linear_weights(lm.model)
    shares = [0.3, 0.5, 0.7]
    masks, threshold = select_masks(magnitude_score_fn, targets, 0.5, layer_sparsity=shares)
    apply_pruning_masks(masks)
    assert threshold is None
    for layer, share in enumerate(shares):
        mine = [m for l, _, m in targets if l == layer]
        numel = sum(m.weight.numel() for m in mine)
        assert sum(int((m.weight == 0).sum()) for m in mine) == round(share * numel)
    with pytest.raises(ValueError, match="2 layer sparsities for 3"):
        select_masks(magnitude_score_fn, targets, 0.5, layer_sparsity=[0.1, 0.2])
    with pytest.raises(ValueError, match="N:M pattern fixes"):
        select_masks(magnitude_score_fn, targets, 0.5, layer_sparsity=shares, nm=(2, 4))


def test_layer_outlier_ratios_count_per_layer(data_dir):
    lm = tiny_random_model("llama")
    layout = get_layout(lm.model)
    ones = {(l, n): torch.ones(m.in_features, dtype=torch.float64) for l, n, m in layout.linear_weights(lm.model)}
    ratios = layer_outlier_ratios(lm.model, layout, ones, m=2.0)  # unit norms: Wanda score = |W|
    for l in range(layout.num_layers):
        w = torch.cat([m.weight.abs().flatten() for ll, _, m in layout.linear_weights(lm.model) if ll == l])
        assert float(ratios[l]) == pytest.approx(float((w > 2 * w.mean()).double().mean()))
