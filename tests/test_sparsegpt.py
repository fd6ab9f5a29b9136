"""SparseGPT (cap_lab.sparsegpt): the blocked algorithm against an obvious OBS loop, its error, its loop, its CLI."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from cap_lab.calibration import CalibrationConfig, build_calibration_set
from cap_lab.cli import main
from cap_lab.modeling import capture_inputs, get_layout
from cap_lab.models import TINY_ARCHS, tiny_random_model
from cap_lab.pruning import PruneConfig, apply_weight_updates, prune_model, wanda_row_mask
from cap_lab.saving import read_prune_info
from cap_lab.sparsegpt import HessianStatistics, sparsegpt_prune_weight, sparsegpt_selected_count

from conftest import obvious_obs_start, spy_on_onloaders, state_copy

CALIB = CalibrationConfig(n_per_task=2, n_subsets=2, max_length=40)


def correlated_inputs(features: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """(tokens, features) inputs with correlated features of unequal scales, like an LLM layer's."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=g, dtype=torch.float64)
    scales = torch.logspace(-1, 1, features, dtype=torch.float64)
    return (torch.randn(tokens, features, generator=g, dtype=torch.float64) @ mixing) * scales


def obvious_sparsegpt(weight, hessian, sparsity, block_size, damping=0.01):
    """The same procedure written the slow, obvious way in float64.

    Per block: the mask is the lowest ``int(s * numel)`` OBS saliencies ``w^2 / [H_F^-1]_cc`` of the
    block's current weights, F = the columns c.. not yet fixed, with the inverse taken explicitly.
    Then column by column, for each row whose weight in column c is removed, the textbook OBS update
    of that row's free weights, ``dw_F = -w_c / [H_F^-1]_cc * [H_F^-1]_c,:``; kept weights become fixed.
    """
    w, free_inverse = obvious_obs_start(weight, hessian, damping)  # free_inverse[c]: inverse Hessian of columns c..
    rows, cols = w.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        saliency = {(r, c): float(w[r, c] ** 2 / free_inverse[c][0, 0]) for r in range(rows) for c in range(start, end)}
        order = sorted(saliency, key=lambda rc: (saliency[rc], rc))  # ties: lower row, then column
        for r, c in order[:int(sparsity * rows * (end - start))]:
            mask[r, c] = True
        for c in range(start, end):
            for r in range(rows):
                if mask[r, c]:
                    w[r, c:] -= w[r, c] / free_inverse[c][0, 0] * free_inverse[c][0]
                    w[r, c] = 0.0
    return mask, w


@pytest.mark.parametrize("block_size", [24, 8, 5])
def test_blocked_algorithm_equals_the_obvious_obs_loop(block_size):
    """Same mask, same updated weights (float64: 1e-10; float32 input: 1e-5 relative)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 24, generator=g, dtype=torch.float64)
    x = correlated_inputs(24, 64)  # (tokens, in)
    x[:, 3] = 0.0  # one dead input
    h = 2 * x.T @ x / x.shape[0]
    expected_mask, expected = obvious_sparsegpt(w, h, 0.5, block_size)
    mask, new = sparsegpt_prune_weight(w, h, 0.5, block_size=block_size)
    assert new.dtype == torch.float64 and torch.equal(mask, expected_mask)
    torch.testing.assert_close(new, expected, rtol=0, atol=1e-10)
    assert mask[:, 3].all() and int(mask.sum()) == sparsegpt_selected_count(8, 24, 0.5, block_size)
    mask32, new32 = sparsegpt_prune_weight(w.float(), h.float(), 0.5, block_size=block_size)
    assert new32.dtype == torch.float32 and torch.equal(mask32, expected_mask)
    assert float((new32.double() - expected).abs().max() / expected.abs().max()) < 1e-5
    assert torch.equal(w, torch.randn(8, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64))  # pure


def test_lower_layer_error_than_wanda_and_magnitude():
    """||W X - W' X||_F at 50%: the OBS update beats both mask-only baselines on one layer."""
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    x = correlated_inputs(64, 512).float()  # (tokens, in)
    h = 2 * x.T @ x / x.shape[0]
    _, sparse = sparsegpt_prune_weight(w, h, 0.5)
    wanda = w.masked_fill(wanda_row_mask(w, (x ** 2).sum(0), 0.5), 0)
    magnitude = w.masked_fill(w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values, 0)
    error = {name: float(((w - v) @ x.T).norm()) for name, v in
             [("sparsegpt", sparse), ("wanda", wanda), ("magnitude", magnitude)]}
    assert error["sparsegpt"] < 0.9 * min(error["wanda"], error["magnitude"]), error
    assert (sparse == 0).sum() == (wanda == 0).sum() == (magnitude == 0).sum() == w.numel() // 2


def test_tiny_model_layer_outputs_closer_than_wanda_and_magnitude(data_dir, one_thread):
    """On every linear of layer 0 (same dense inputs for all three), SparseGPT's outputs are the closest."""
    dense = tiny_random_model("llama")
    layout = get_layout(dense.model)
    calib = build_calibration_set(dense.tokenizer, CALIB, data_dir)
    inputs = {}
    modules = {n: m for l, n, m in layout.linear_weights(dense.model) if l == 0}
    with torch.no_grad(), capture_inputs(modules, lambda n, x: inputs.setdefault(n, []).append(x)):
        for batch in calib.batches(list(range(len(calib.items))), 4):
            inputs.setdefault("mask", []).append(batch.attention_mask.bool())
            dense.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    tokens = {n: torch.cat([x[m] for x, m in zip(inputs[n], inputs["mask"])]) for n in modules}  # (T, in)
    errors = {}
    for config in (PruneConfig("sparsegpt", 0.5), PruneConfig("wanda", 0.5),
                   PruneConfig("magnitude", 0.5, magnitude_scope="layer")):
        lm = tiny_random_model("llama")
        prune_model(lm.model, config, calib=calib, batch_size=4, progress=False)
        pruned = {n: m for l, n, m in layout.linear_weights(lm.model) if l == 0}
        errors[config.method] = {n: float(((modules[n].weight - pruned[n].weight).detach() @ tokens[n].T).norm())
                                 for n in modules}
    for name in modules:
        assert errors["sparsegpt"][name] < min(errors["wanda"][name], errors["magnitude"][name]), (name, errors)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sequential_on_the_already_pruned_prefix(arch, data_dir, one_thread):
    """Layer l's Hessians come from the model whose layers < l are already pruned and updated."""
    lm, ref = tiny_random_model(arch), tiny_random_model(arch)
    calib = build_calibration_set(lm.tokenizer, CALIB, data_dir)
    prune_model(lm.model, PruneConfig("sparsegpt", 0.4), calib=calib, batch_size=4, progress=False)
    layout = get_layout(ref.model)
    for layer in range(layout.num_layers):  # the reference loop, written out with full forwards
        mods = {n: m for l, n, m in layout.linear_weights(ref.model) if l == layer}
        stats, current = HessianStatistics(mods), {}
        with torch.no_grad(), capture_inputs(mods, lambda n, x: stats.add(n, x, current["mask"])):
            for b in calib.batches(list(range(len(calib.items))), 4):
                current["mask"] = b.attention_mask
                ref.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
        with torch.no_grad():
            for n, m in mods.items():
                m.weight.copy_(sparsegpt_prune_weight(m.weight, stats.hessian(n), 0.4)[1])
    for (_, n, a), (_, _, b) in zip(layout.linear_weights(lm.model), layout.linear_weights(ref.model)):
        assert torch.equal(a.weight == 0, b.weight == 0), n
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_family_gets_exactly_the_promised_count(arch, sparsity, data_dir, one_thread):
    lm = tiny_random_model(arch)
    layout = get_layout(lm.model)
    calib = build_calibration_set(lm.tokenizer, CALIB, data_dir)
    before = state_copy(lm.model)
    res = prune_model(lm.model, PruneConfig("sparsegpt", sparsity, sparsegpt_block_size=16), calib=calib,
                      batch_size=4, progress=False)
    promised = 0
    for l, n, m in layout.linear_weights(lm.model):
        count = sparsegpt_selected_count(*m.weight.shape, sparsity, block_size=16)
        assert int((m.weight == 0).sum()) == count, (l, n)
        kept = m.weight != 0
        assert not torch.equal(m.weight[kept], before[_key(layout, l, n)][kept]), (l, n)  # OBS-updated survivors
        promised += count
    assert res.selected == promised and res.achieved_sparsity == promised / res.total
    if sparsity == 0.5:
        assert res.achieved_sparsity == 0.5  # every tiny matrix has an even number of rows
    prunable = {_key(layout, l, n) for l, n, _ in layout.linear_weights(lm.model)}
    after = state_copy(lm.model)
    assert all(torch.equal(before[k], after[k]) for k in before if k not in prunable)  # embeddings, norms, lm_head


def _key(layout, layer, name):
    part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"{layout.spec.layers}.{layer}.{part}.{name}.weight"


def test_execution_device_gives_identical_weights(data_dir, monkeypatch, one_thread):
    in_memory, layered = tiny_random_model("qwen3"), tiny_random_model("qwen3")
    calib = build_calibration_set(in_memory.tokenizer, CALIB, data_dir)
    expected = prune_model(in_memory.model, PruneConfig("sparsegpt", 0.5), calib=calib, batch_size=4, progress=False)
    onloaders = spy_on_onloaders(monkeypatch)
    result = prune_model(layered.model, PruneConfig("sparsegpt", 0.5), calib=calib, batch_size=4, progress=False,
                         execution_device="cpu")
    assert result.selected == expected.selected
    a, b = state_copy(in_memory.model), state_copy(layered.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    (onloader,) = onloaders
    assert onloader.peak_resident == 1 and onloader.resident == ()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_execution_device_cuda_matches_cpu(data_dir):
    cpu, gpu = tiny_random_model("llama"), tiny_random_model("llama")
    calib = build_calibration_set(cpu.tokenizer, CALIB, data_dir)
    prune_model(cpu.model, PruneConfig("sparsegpt", 0.5), calib=calib, batch_size=4, progress=False)
    prune_model(gpu.model, PruneConfig("sparsegpt", 0.5), calib=calib, batch_size=4, progress=False,
                execution_device="cuda")
    for (_, n, a), (_, _, b) in zip(get_layout(cpu.model).linear_weights(cpu.model),
                                    get_layout(gpu.model).linear_weights(gpu.model)):
        assert b.weight.device.type == "cpu"
        assert float((a.weight != 0).ne(b.weight != 0).float().mean()) < 0.01, n  # GPU rounding flips near-ties
        assert int((b.weight == 0).sum()) == int((a.weight == 0).sum()), n


def test_bfloat16_weights_are_computed_in_float32():
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(3)).bfloat16()
    x = correlated_inputs(16, 40).float()
    h = 2 * x.T @ x / 40
    mask, new = sparsegpt_prune_weight(w, h, 0.5, block_size=8)
    mask32, new32 = sparsegpt_prune_weight(w.float(), h, 0.5, block_size=8)
    assert new.dtype == torch.float32 and torch.equal(mask, mask32) and torch.equal(new, new32)
    layer = torch.nn.Linear(16, 6, bias=False).bfloat16()
    assert apply_weight_updates([(layer, mask, new)]) == 48
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight == 0, mask)
    torch.testing.assert_close(layer.weight.float(), new, rtol=1e-2, atol=1e-2)


def test_bad_arguments_name_the_value():
    w, h = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        sparsegpt_prune_weight(w, torch.eye(4), 0.5)
    with pytest.raises(ValueError, match="block_size=0"):
        sparsegpt_prune_weight(w, h, 0.5, block_size=0)
    with pytest.raises(ValueError, match="sparsity=1.0"):
        sparsegpt_prune_weight(w, h, 1.0)
    with pytest.raises(ValueError, match="damping=0"):  # fewer tokens than inputs: singular without damping
        x = torch.randn(3, 8)
        sparsegpt_prune_weight(w, x.T @ x, 0.5, damping=0.0)
    with pytest.raises(ValueError, match="sparsegpt_block_size=0"):
        PruneConfig("sparsegpt", 0.5, sparsegpt_block_size=0)
    with pytest.raises(ValueError, match="sparsegpt_damping=-0.1"):
        PruneConfig("sparsegpt", 0.5, sparsegpt_damping=-0.1)
    with pytest.raises(ValueError, match="new weight of shape"):
        apply_weight_updates([(torch.nn.Linear(8, 4), torch.zeros(4, 8, dtype=torch.bool), torch.zeros(8, 4))])


def test_needs_a_calibration_set(tiny):
    with pytest.raises(ValueError, match="'sparsegpt' needs a calibration set"):
        prune_model(tiny.model, PruneConfig("sparsegpt", 0.5))


def test_cli_writes_a_checkpoint_with_the_same_zeros(tiny_dir, data_dir, tmp_path, one_thread):
    out = tmp_path / "p-sparsegpt"
    argv = ["prune", "--model", str(tiny_dir), "--device", "cpu", "--data-dir", str(data_dir), "--calib-per-task", "2",
            "--subsets", "2", "--max-length", "40", "--batch-size", "4", "--method", "sparsegpt", "--sparsity", "0.5",
            "--sparsegpt-block-size", "16", "--out", str(out)]
    assert main(argv) == 0
    info = read_prune_info(out)
    assert info["method"] == "sparsegpt" and info["achieved_sparsity"] == 0.5 and info["sparsegpt_block_size"] == 16
    assert info["calibration"]["n_per_task"] == 2
    back = AutoModelForCausalLM.from_pretrained(out)
    lm = tiny_random_model("llama", seed=0)  # what tiny_dir holds
    calib = build_calibration_set(lm.tokenizer, CALIB, data_dir)
    prune_model(lm.model, PruneConfig("sparsegpt", 0.5, sparsegpt_block_size=16), calib=calib, batch_size=4,
                progress=False)
    layout = get_layout(back)
    for (_, n, a), (_, _, b) in zip(layout.linear_weights(back), layout.linear_weights(lm.model)):
        assert torch.equal(a.weight == 0, b.weight == 0), n
        assert int((a.weight == 0).sum()) == a.weight.numel() // 2, n
        torch.testing.assert_close(a.weight, b.weight)
