"""N:M semi-structured sparsity (cap_lab.selection) and OWL layer-wise allocation (cap_lab.sparsity_allocation)."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from cap_lab.calibration import CalibrationConfig, build_calibration_set
from cap_lab.cli import main
from cap_lab.modeling import capture_inputs, get_layout
from cap_lab.models import TINY_ARCHS, tiny_random_model
from cap_lab.cap_scores import cap_score_fn
from cap_lab.pruning import (
    PruneConfig, apply_pruning_masks, magnitude_score_fn, prune_model, random_score_fn, sparsity_by,
)
from cap_lab.saving import read_prune_info
from cap_lab.selection import check_nm, nm_group_nonzeros, nm_prune_mask, nm_sparsity, select_masks
from cap_lab.sparsegpt import sparsegpt_prune_weight, sparsegpt_selected_count
from cap_lab.sparsity_allocation import (
    input_sq_sums, layer_outlier_ratios, outlier_ratio, owl_allocation, owl_layer_sparsities,
)
from cap_lab.wanda import wanda_row_mask, wanda_score

from conftest import obvious_obs_start, state_copy


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
    onloaded = input_sq_sums(lm.model, layout, calib, batch_size=3, execution_device="cpu")  # layer-by-layer bookkeeping
    assert all(torch.equal(onloaded[k], sums[k]) for k in sums)


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


# ------------------------------------------------------------------ through PruneConfig / prune_model
def test_prune_config_reconciles_nm_and_sparsity():
    assert PruneConfig().sparsity == 0.2 and PruneConfig(nm=(2, 4)).sparsity == 0.5
    assert PruneConfig(nm=[4, 8], sparsity=0.5).nm == (4, 8) and PruneConfig(nm=(1, 4)).sparsity == 0.75
    for kwargs, needle in [(dict(nm=(2, 4), sparsity=0.3), "sparsity=0.3 conflicts with nm=2:4"),
                           (dict(nm=(3, 2)), r"nm=\(3, 2\)"), (dict(owl=True, nm=(2, 4)), "owl with nm=2:4"),
                           (dict(owl=True, owl_lambda=-0.1), "owl_lambda=-0.1"), (dict(owl_m=0.0), "owl_m=0.0"),
                           (dict(owl=True, sparsity=0.95), "owl_lambda=0.08"),
                           (dict(method="sparsegpt", nm=(2, 4), sparsegpt_block_size=6), "sparsegpt_block_size=6")]:
        with pytest.raises(ValueError, match=needle):
            PruneConfig(**kwargs)


def obvious_nm_sparsegpt(weight, hessian, n, m, damping=0.01):
    """SparseGPT's N:M (reference ``prunen``/``prunem``) written out in float64 with explicit inverses:
    at the first column of each group, every row removes its M - N lowest ``w^2 / [H_F^-1]_cc`` of the
    group (current weights); then the textbook OBS update of each removed weight, column by column."""
    w, free_inverse = obvious_obs_start(weight, hessian, damping)
    rows, cols = w.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for c in range(cols):
        if c % m == 0:
            for r in range(rows):
                saliency = [float(w[r, c + j] ** 2 / free_inverse[c + j][0, 0]) for j in range(m)]
                for j in sorted(range(m), key=lambda j: (saliency[j], j))[:m - n]:
                    mask[r, c + j] = True
        for r in range(rows):
            if mask[r, c]:
                w[r, c:] -= w[r, c] / free_inverse[c][0, 0] * free_inverse[c][0]
                w[r, c] = 0.0
    return mask, w


@pytest.mark.parametrize("nm, block_size", [((2, 4), 8), ((2, 4), 24), ((4, 8), 8)])
def test_sparsegpt_nm_equals_the_obvious_loop(nm, block_size):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 24, generator=g, dtype=torch.float64)
    x = torch.randn(64, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    h = 2 * x.T @ x / 64
    expected_mask, expected = obvious_nm_sparsegpt(w, h, *nm)
    mask, new = sparsegpt_prune_weight(w, h, 0.5, block_size=block_size, nm=nm)
    assert torch.equal(mask, expected_mask) and int(mask.sum()) == sparsegpt_selected_count(6, 24, 0.5, nm=nm) == 72
    torch.testing.assert_close(new, expected, rtol=0, atol=1e-10)
    assert bool((nm_group_nonzeros(new, nm[1]) == nm[0]).all())
    with pytest.raises(ValueError, match="sparsegpt_block_size=6 with nm=2:4"):
        sparsegpt_prune_weight(w, h, 0.5, block_size=6, nm=(2, 4))


def test_wanda_nm_is_the_nm_mask_of_wandas_score():
    g = torch.Generator().manual_seed(5)
    w, norms = torch.randn(4, 16, generator=g), torch.rand(16, generator=g) * 10
    assert torch.equal(wanda_row_mask(w, norms, 0.3, nm=(2, 4)), nm_prune_mask(w.abs() * norms.sqrt(), 2, 4))
    assert torch.equal(wanda_score(w, norms), w.abs() * norms.sqrt())


@pytest.mark.parametrize("config", [PruneConfig(method="cap", nm=(2, 4)), PruneConfig(method="wanda", nm=(2, 4)),
                                    PruneConfig(method="sparsegpt", nm=(2, 4), sparsegpt_block_size=16),
                                    PruneConfig(method="magnitude", nm=(4, 8)),
                                    PruneConfig(method="magnitude", magnitude_scope="layer", nm=(2, 4)),
                                    PruneConfig(method="random", nm=(4, 8)), PruneConfig(method="sparsegpt", nm=(4, 8))],
                         ids=lambda c: f"{c.method}-{c.magnitude_scope}-{c.nm[0]}:{c.nm[1]}")
def test_prune_model_gives_the_exact_nm_pattern(config, data_dir, one_thread):
    lm = tiny_random_model("gemma3")  # o_proj has 64 inputs, the others 32 and 48
    layout = get_layout(lm.model)
    res = prune_model(lm.model, config, head_scores=torch.rand(layout.num_layers, layout.num_heads),
                      calib=small_calib(lm, data_dir), progress=False)
    assert res.achieved_sparsity == 0.5 and res.threshold is None and res.summary()["nm"] == config.nm
    assert_exact_nm(lm.model, config.nm)


def test_prune_model_checks_nm_shapes_before_pruning(data_dir):
    lm = tiny_random_model("llama", intermediate_size=44)
    before = state_copy(lm.model)
    with pytest.raises(ValueError, match=r"layer 0 down_proj has shape \(32, 44\)"):
        prune_model(lm.model, PruneConfig(method="wanda", nm=(4, 8)), calib=small_calib(lm, data_dir), progress=False)
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="'magnitude' with owl needs a calibration set"):
        prune_model(lm.model, PruneConfig(method="magnitude", owl=True))


@pytest.mark.parametrize("config, slack", [
    (PruneConfig(method="cap", sparsity=0.5, owl=True, owl_lambda=0.1), 1e-3),
    (PruneConfig(method="magnitude", sparsity=0.5, owl=True, owl_lambda=0.1), 1e-3),
    (PruneConfig(method="magnitude", magnitude_scope="layer", sparsity=0.5, owl=True, owl_lambda=0.1), 1e-3),
    (PruneConfig(method="random", sparsity=0.5, owl=True, owl_lambda=0.1), 1e-3),
    (PruneConfig(method="wanda", sparsity=0.5, owl=True, owl_lambda=0.1), 1 / 32),  # int(in * s_l) per row, in >= 32
    (PruneConfig(method="sparsegpt", sparsity=0.5, owl=True, owl_lambda=0.1), 1e-3),
], ids=lambda c: f"{c.method}-{c.magnitude_scope}" if isinstance(c, PruneConfig) else "")
def test_owl_prunes_every_layer_to_its_share(config, slack, data_dir, one_thread):
    """Achieved per-layer sparsities follow OWL's allocation; their numel-weighted mean (the model's
    sparsity; every layer has the same numel here, so also the plain mean) is the target."""
    lm = tiny_random_model("llama", num_hidden_layers=4)
    layout = get_layout(lm.model)
    with torch.no_grad():
        for _, _, m in [t for t in layout.linear_weights(lm.model) if t[0] == 2]:
            m.weight[:, :2] *= 40  # layer 2 holds the outliers
    res = prune_model(lm.model, config, head_scores=torch.rand(layout.num_layers, layout.num_heads),
                      calib=small_calib(lm, data_dir), progress=False)
    shares = res.allocation.layer_sparsity
    assert float(shares.mean()) == pytest.approx(0.5, abs=1e-12) and int(torch.argmin(shares)) == 2
    by_layer = sparsity_by(res.report, "layer")
    achieved = torch.tensor(by_layer["sparsity"].tolist(), dtype=torch.float64)
    assert float((achieved - shares).abs().max()) <= slack
    assert abs(res.achieved_sparsity - 0.5) <= slack
    assert res.summary()["owl_allocation"]["layer_sparsity"] == shares.tolist()


# ------------------------------------------------------------------ command line
def test_cli_nm_checkpoint_reloads_with_the_exact_pattern(tiny_dir, data_dir, tmp_path, capsys, one_thread):
    common = ["--model", str(tiny_dir), "--data-dir", str(data_dir), "--calib-per-task", "2", "--subsets", "2",
              "--max-length", "32"]
    out = tmp_path / "cap-2-4"
    assert main(["prune", *common, "--method", "cap", "--nm", "2:4", "--out", str(out)]) == 0
    assert "2:4 pattern: at most 2 non-zeros in every group of 4 inputs, in all 21 matrices" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    assert_exact_nm(model, (2, 4))
    info = read_prune_info(out)
    assert info["nm"] == [2, 4] and info["sparsity"] == 0.5 and info["achieved_sparsity"] == 0.5
    assert json.loads((out / "cap_lab.json").read_text())["method"] == "cap"
    owl = tmp_path / "owl"
    assert main(["prune", *common, "--method", "magnitude", "--sparsity", "0.4", "--owl", "--owl-lambda", "0.1",
                 "--owl-m", "3", "--out", str(owl)]) == 0
    info = read_prune_info(owl)["owl_allocation"]
    assert info["owl_lambda"] == 0.1 and info["owl_m"] == 3.0 and len(info["layer_sparsity"]) == 3
    assert sum(info["layer_sparsity"]) / 3 == pytest.approx(0.4) and "owl: layer sparsities" in capsys.readouterr().out


@pytest.mark.parametrize("args, needle", [
    (["--method", "magnitude"], "--sparsity is required (or --nm N:M"),
    (["--nm", "4:2"], "argument --nm: '4:2' is not an N:M pattern"),
    (["--nm", "2-4"], "argument --nm: '2-4' is not an N:M pattern"),
    (["--nm", "2:4", "--sparsity", "0.3"], "sparsity=0.3 conflicts with nm=2:4"),
    (["--nm", "2:4", "--owl"], "owl with nm=2:4"),
    (["--sparsity", "0.5", "--owl", "--owl-m", "0"], "argument --owl-m"),
])
def test_cli_nm_owl_mistakes_are_one_line(args, needle, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CAP_LAB_DATA", str(data_dir))
    assert main(["prune", *args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cap-lab: error:") and needle in err and "\n" not in err
