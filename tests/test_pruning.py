import pytest
import torch

from cap_lab.modeling import get_layout
from cap_lab.calibration import CalibrationConfig, build_calibration_set
from cap_lab.modeling import capture_inputs
from cap_lab.models import TINY_ARCHS, tiny_random_model
from cap_lab.cap_scores import importance_factors, region_factors
from cap_lab.pruning import PruneConfig, prune_model, sparsity_by, wanda_row_mask

from conftest import state_copy


def test_importance_factors_on_hand_made_scores():
    s = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    torch.testing.assert_close(importance_factors(s), torch.tensor([[1.0, 3.25], [5.5, 10.0]]))
    torch.testing.assert_close(importance_factors(torch.full((2, 3), 0.7)), torch.ones(2, 3))
    assert importance_factors(torch.tensor([[-5.0, 5.0]])).tolist() == [[1.0, 10.0]]


def test_region_mapping_under_gqa():
    lm = tiny_random_model("gemma3")  # 4 heads, 2 KV heads, head_dim 16
    layout = get_layout(lm.model)
    f = torch.tensor([[1.0, 3.0, 5.0, 10.0]] * layout.num_layers)
    reg = region_factors(f, layout, "mean")
    d = 16
    q = reg[(0, "q_proj")].rows
    assert q.shape == (64,) and q[:d].eq(1).all() and q[d:2 * d].eq(3).all() and q[3 * d:].eq(10).all()
    k = reg[(0, "k_proj")].rows  # KV head 0 serves heads 0,1; KV head 1 serves heads 2,3
    assert k.shape == (32,) and k[:d].eq(2).all() and k[d:].eq(7.5).all()
    assert torch.equal(reg[(0, "v_proj")].rows, k)
    o = reg[(0, "o_proj")].cols
    assert o.shape == (64,) and o[2 * d:3 * d].eq(5).all()
    assert reg[(0, "up_proj")].scalar == pytest.approx(4.75)
    kmax = region_factors(f, layout, "max")[(0, "k_proj")].rows
    assert kmax[:d].eq(3).all() and kmax[d:].eq(10).all()
    w = lm.model.model.layers[0].self_attn.o_proj.weight  # (hidden 32, H*D 64): columns by head
    assert reg[(0, "o_proj")].expand(w).shape == (1, 64)


@pytest.mark.parametrize("method", ["cap", "magnitude"])
@pytest.mark.parametrize("sparsity", [0.1, 0.2, 0.5, 0.73])
def test_global_threshold_hits_the_target(method, sparsity):
    lm = tiny_random_model("qwen2")
    layout = get_layout(lm.model)
    scores = torch.randn(layout.num_layers, layout.num_heads, generator=torch.Generator().manual_seed(1))
    res = prune_model(lm.model, PruneConfig(method=method, sparsity=sparsity), head_scores=scores)
    assert abs(res.achieved_sparsity - sparsity) <= 1e-4
    assert res.selected == pytest.approx(sparsity * res.total, abs=1e-4 * res.total)


def test_cap_prunes_low_importance_heads_more():
    lm = tiny_random_model("llama")
    layout = get_layout(lm.model)
    scores = torch.zeros(layout.num_layers, layout.num_heads)
    scores[:, 0] = 1.0  # head 0 of every layer is critical
    prune_model(lm.model, PruneConfig(method="cap", sparsity=0.3), head_scores=scores)
    d = layout.head_dim
    q = lm.model.model.layers[1].self_attn.q_proj.weight
    assert (q[:d] == 0).float().mean() < (q[d:2 * d] == 0).float().mean()


def test_ties_are_broken_to_reach_the_target():
    lm = tiny_random_model("llama")
    with torch.no_grad():
        for p in lm.model.parameters():
            p.copy_(torch.sign(p))  # every |w| is 1: a threshold alone cannot split them
    res = prune_model(lm.model, PruneConfig(method="magnitude", sparsity=0.3))
    assert abs(res.achieved_sparsity - 0.3) <= 1e-4


def test_wanda_equals_a_direct_per_row_computation(data_dir):
    lm = tiny_random_model("mistral", num_hidden_layers=1)
    layout = get_layout(lm.model)
    calib = build_calibration_set(lm.tokenizer, CalibrationConfig(n_per_task=2, n_subsets=2, max_length=40), data_dir)
    dense = state_copy(lm.model)
    feats = {}
    mods = {n: m for _, n, m in layout.linear_weights(lm.model)}
    with torch.no_grad(), capture_inputs(mods, lambda n, x: feats.setdefault(n, []).append(x)):
        masks = []
        for b in calib.batches(list(range(len(calib.items))), 3):
            masks.append(b.attention_mask.bool())
            lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    prune_model(lm.model, PruneConfig(method="wanda", sparsity=0.5), calib=calib, batch_size=3, progress=False)
    for name, m in mods.items():
        x = torch.cat([xb[mb] for xb, mb in zip(feats[name], masks)])  # (tokens, in)
        norm = x.norm(dim=0)
        w = dense[f"model.layers.0.{'self_attn' if name in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{name}.weight"]
        metric = w.abs() * norm
        k = int(w.shape[1] * 0.5)
        for row in range(w.shape[0]):
            pruned = set(torch.argsort(metric[row])[:k].tolist())
            zero = set((m.weight[row] == 0).nonzero().squeeze(1).tolist())
            assert zero == pruned, (name, row)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_wanda_is_sequential_like_the_reference(arch, data_dir):
    """Layer l's statistics come from the model whose layers < l are already pruned."""
    lm, ref = tiny_random_model(arch), tiny_random_model(arch)
    calib = build_calibration_set(lm.tokenizer, CalibrationConfig(n_per_task=2, n_subsets=2, max_length=40), data_dir)
    prune_model(lm.model, PruneConfig(method="wanda", sparsity=0.4), calib=calib, batch_size=4, progress=False)
    layout = get_layout(ref.model)
    for layer in range(layout.num_layers):  # the reference loop, written out with full forwards
        mods = {n: m for l, n, m in layout.linear_weights(ref.model) if l == layer}
        sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in mods.items()}
        keep = {}
        cb = lambda n, x: sums[n].add_((x.double() ** 2 * keep["m"].unsqueeze(-1)).sum(dim=(0, 1)))
        with torch.no_grad(), capture_inputs(mods, cb):
            for b in calib.batches(list(range(len(calib.items))), 4):
                keep["m"] = b.attention_mask.double()
                ref.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
        with torch.no_grad():
            for n, m in mods.items():
                m.weight[wanda_row_mask(m.weight, sums[n], 0.4)] = 0
    for (_, n, a), (_, _, b) in zip(layout.linear_weights(lm.model), layout.linear_weights(ref.model)):
        assert torch.equal(a.weight == 0, b.weight == 0), n


def test_wanda_row_mask_counts():
    w = torch.randn(5, 10)
    mask = wanda_row_mask(w, torch.ones(10), 0.35)
    assert mask.sum(dim=1).tolist() == [3] * 5


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("config", [PruneConfig(method="cap"), PruneConfig(method="wanda"),
                                    PruneConfig(method="magnitude"), PruneConfig(method="magnitude", magnitude_scope="layer"),
                                    PruneConfig(method="random")])
def test_methods_never_touch_embeddings_norms_or_lm_head(arch, config, data_dir):
    lm = tiny_random_model(arch)
    layout = get_layout(lm.model)
    calib = build_calibration_set(lm.tokenizer, CalibrationConfig(n_per_task=1, n_subsets=1, max_length=24), data_dir)
    before = state_copy(lm.model)
    res = prune_model(lm.model, config, head_scores=torch.rand(layout.num_layers, layout.num_heads), calib=calib, progress=False)
    after = state_copy(lm.model)
    prunable = {f"{layout.spec.layers}.{l}.{'self_attn' if n.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{n}.weight"
                for l, n, _ in layout.linear_weights(lm.model)}
    for k in before:
        if k in prunable:
            continue
        assert torch.equal(before[k], after[k]), k
    assert 0.15 < res.achieved_sparsity < 0.25
    assert set(sparsity_by(res.report, "matrix")["matrix"]) == {"q", "k", "v", "o", "gate", "up", "down"}


def test_random_is_seeded():
    a, b, c = (tiny_random_model("llama") for _ in range(3))
    prune_model(a.model, PruneConfig(method="random", sparsity=0.4, seed=3))
    prune_model(b.model, PruneConfig(method="random", sparsity=0.4, seed=3))
    prune_model(c.model, PruneConfig(method="random", sparsity=0.4, seed=4))
    wa, wb, wc = (m.model.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa == 0, wb == 0) and not torch.equal(wa == 0, wc == 0)


def test_random_counts_existing_zeros_toward_the_target():
    lm = tiny_random_model("llama")
    layout = get_layout(lm.model)
    with torch.no_grad():
        for _, _, m in layout.linear_weights(lm.model):
            m.weight.view(-1)[::50] = 0.0  # 2% zeros of its own, as a de-quantized checkpoint has
    res = prune_model(lm.model, PruneConfig(method="random", sparsity=0.3, seed=0), progress=False)
    zeros = total = 0
    for _, _, m in layout.linear_weights(lm.model):  # exactly round(0.3 * numel) zeros, not more
        assert (m.weight == 0).sum().item() == round(0.3 * m.weight.numel())
        zeros, total = zeros + round(0.3 * m.weight.numel()), total + m.weight.numel()
    assert res.achieved_sparsity == pytest.approx(zeros / total)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(sparsity=1.0), "sparsity=1.0"), (dict(sparsity=-0.1), "sparsity=-0.1"),
    (dict(method="obd"), "obd"), (dict(kv_reduce="min"), "min"), (dict(magnitude_scope="row"), "row"),
])
def test_bad_prune_config(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        PruneConfig(**kwargs)


def test_cap_needs_scores_of_the_right_shape(tiny):
    with pytest.raises(ValueError, match="head_scores"):
        prune_model(tiny.model, PruneConfig(method="cap"))
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        prune_model(tiny.model, PruneConfig(method="cap"), head_scores=torch.zeros(2, 2))
