"""CAP variants: per-neuron MLP factors, activation-aware scores, per-layer thresholds (and the CLI flags).

Each variant's masks are checked against Eq. 3-4 written out region by region with one sort over
all scores (the obvious implementation); the defaults must give the paper's CAP exactly.
"""
import json

import pytest
import torch

from cap_lab.calibration import CalibrationConfig, build_calibration_set
from cap_lab.cap_scores import cap_score_fn, importance_factors, neuron_importance_factors, region_factors
from cap_lab.cli import main
from cap_lab.modeling import capture_inputs, get_layout
from cap_lab.models import tiny_random_model
from cap_lab.pruning import PruneConfig, prune_model
from cap_lab.saving import read_prune_info
from cap_lab.sparsity_allocation import input_sq_sums
from cap_lab.wanda import wanda_row_mask, wanda_score

WIDTH = 48  # the tiny models' intermediate size


def _head_scores(layout, seed=3):
    return torch.randn(layout.num_layers, layout.num_heads, generator=torch.Generator().manual_seed(seed))


def _neuron_scores(layout, seed=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(WIDTH, generator=g) for _ in range(layout.num_layers)]


def _minmax(s: torch.Tensor) -> torch.Tensor:
    s = s.double()
    return (1 + 9 * (s - s.min()) / (s.max() - s.min())).float()


def reference_scores(model, heads, neurons=None, sq=None) -> dict:
    """Eq. 3-4 the obvious way: every weight's factor written by its head or neuron. {(l, name): (out, in)}."""
    layout = get_layout(model)
    f, d, g = _minmax(heads), layout.head_dim, layout.group_size
    nf = _minmax(torch.stack(neurons)) if neurons is not None else None
    out = {}
    for l, name, m in layout.linear_weights(model):
        w = m.weight.detach().abs().float()
        if sq is not None:
            w = w * sq[(l, name)].float().sqrt().view(1, -1)
        factor = torch.empty_like(w)
        if name == "q_proj":
            for h in range(layout.num_heads):
                factor[h * d:(h + 1) * d] = f[l, h]
        elif name in ("k_proj", "v_proj"):
            for kv in range(layout.num_kv_heads):
                factor[kv * d:(kv + 1) * d] = f[l, kv * g:(kv + 1) * g].mean()
        elif name == "o_proj":
            for h in range(layout.num_heads):
                factor[:, h * d:(h + 1) * d] = f[l, h]
        elif nf is None:
            factor[:] = float(f[l].mean())
        elif name in ("gate_proj", "up_proj"):
            for j in range(WIDTH):
                factor[j] = nf[l, j]
        else:  # down_proj
            for j in range(WIDTH):
                factor[:, j] = nf[l, j]
        out[(l, name)] = w * factor
    return out


def reference_masks(model, scores: dict, sparsity: float, per_layer: bool = False) -> list[torch.Tensor]:
    """Prune the lowest round(s * n) scores of the model (or of each layer); masks in parameter order."""
    keys = [(l, n) for l, n, _ in get_layout(model).linear_weights(model)]
    groups = sorted({l for l, _ in keys}) if per_layer else [None]
    masks = {}
    for group in groups:
        mine = [k for k in keys if group is None or k[0] == group]
        flat = torch.cat([scores[k].flatten() for k in mine])
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        chosen[torch.sort(flat, stable=True).indices[:round(sparsity * flat.numel())]] = True
        for k, part in zip(mine, chosen.split([scores[k].numel() for k in mine])):
            masks[k] = part.view_as(scores[k])
    return [masks[k] for k in keys]


def pruned_masks(model) -> list[torch.Tensor]:
    return [m.weight == 0 for _, _, m in get_layout(model).linear_weights(model)]


@pytest.fixture
def calib(data_dir):
    lm = tiny_random_model("llama")
    return build_calibration_set(lm.tokenizer, CalibrationConfig(n_per_task=2, n_subsets=2, max_length=32), data_dir)


# ------------------------------------------------------------------ defaults
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_default_config_is_the_papers_cap_exactly(arch, one_thread):
    lm = tiny_random_model(arch, seed=1)
    heads = _head_scores(get_layout(lm.model))
    want = reference_masks(lm.model, reference_scores(lm.model, heads), 0.3)
    config = PruneConfig(method="cap", sparsity=0.3)
    assert (config.cap_mlp_factors, config.cap_activation, config.cap_scope) == ("layer_mean", False, "global")
    result = prune_model(lm.model, config, head_scores=heads)
    assert all(torch.equal(a, b) for a, b in zip(pruned_masks(lm.model), want))
    assert result.threshold is not None


# ------------------------------------------------------------------ per-neuron MLP factors
def test_neuron_factors_land_on_their_gate_up_rows_and_down_column():
    lm = tiny_random_model("llama")
    layout = get_layout(lm.model)
    neurons = _neuron_scores(layout)
    nf = neuron_importance_factors(neurons, layout, [WIDTH] * layout.num_layers)  # (L, I), Eq. 3 over the model
    assert nf.shape == (3, WIDTH) and float(nf.min()) == 1.0 and float(nf.max()) == 10.0
    torch.testing.assert_close(nf, importance_factors(torch.stack(neurons)))
    reg = region_factors(torch.ones(3, 4), layout, neuron_factors=nf)
    for l in range(3):
        assert torch.equal(reg[(l, "gate_proj")].rows, nf[l]) and torch.equal(reg[(l, "up_proj")].rows, nf[l])
        assert torch.equal(reg[(l, "down_proj")].cols, nf[l])
        assert reg[(l, "q_proj")].rows.eq(1).all()  # equal head scores: attention untouched
    fn = cap_score_fn(_head_scores(layout), layout, neuron_factors=nf)
    mlp = layout.mlp(lm.model, 1)
    gate, down = mlp.gate_proj.weight, mlp.down_proj.weight  # (I, d), (d, I)
    torch.testing.assert_close(fn(1, "gate_proj", gate), gate.abs() * nf[1].view(-1, 1), rtol=0, atol=0)
    torch.testing.assert_close(fn(1, "up_proj", mlp.up_proj.weight), mlp.up_proj.weight.abs() * nf[1].view(-1, 1))
    torch.testing.assert_close(fn(1, "down_proj", down), down.abs() * nf[1].view(1, -1), rtol=0, atol=0)


def test_neuron_variant_masks_equal_the_written_out_scores(one_thread):
    lm = tiny_random_model("qwen2", seed=2)
    layout = get_layout(lm.model)
    heads, neurons = _head_scores(layout), _neuron_scores(layout)
    neurons[1][7] = 100.0  # one critical neuron: factor 10, every other neuron near 1
    want = reference_masks(lm.model, reference_scores(lm.model, heads, neurons), 0.4)
    prune_model(lm.model, PruneConfig(method="cap", sparsity=0.4, cap_mlp_factors="neuron"), head_scores=heads,
                neuron_scores=torch.stack(neurons))  # an (L, I) tensor works as well as a list
    got = pruned_masks(lm.model)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    mlp = layout.mlp(lm.model, 1)
    for row, whole in ((mlp.gate_proj.weight[7], mlp.gate_proj.weight), (mlp.down_proj.weight[:, 7], mlp.down_proj.weight)):
        assert (row == 0).float().mean() < 0.5 * (whole == 0).float().mean()  # the critical neuron is spared


# ------------------------------------------------------------------ activation-aware
def _direct_sq_sums(model, calib) -> dict:
    """Sum of squares of every prunable linear's inputs over the real tokens: one dense forward, by hand."""
    layout = get_layout(model)
    modules = {(l, n): m for l, n, m in layout.linear_weights(model)}
    sums, current = {k: 0.0 for k in modules}, {}

    def add(key, x):  # x: (B, S, in)
        sums[key] = sums[key] + (x.double() ** 2 * current["mask"].double().unsqueeze(-1)).sum(dim=(0, 1))

    with torch.no_grad(), capture_inputs(modules, add):
        for batch in calib.batches(list(range(len(calib.items))), 4):
            current["mask"] = batch.attention_mask
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return sums


def test_activation_aware_cap_is_wandas_score_times_the_factor(calib, one_thread):
    lm = tiny_random_model("llama")
    layout = get_layout(lm.model)
    heads = _head_scores(layout)
    sq = _direct_sq_sums(lm.model, calib)
    measured = input_sq_sums(lm.model, layout, calib, batch_size=4)
    for key in sq:
        torch.testing.assert_close(measured[key], sq[key], rtol=1e-5, atol=0)
    fn = cap_score_fn(heads, layout, input_sq_sums=measured)
    regions = region_factors(importance_factors(heads), layout)
    for l, name, m in layout.linear_weights(lm.model):
        want = wanda_score(m.weight, measured[(l, name)]) * regions[(l, name)].expand(m.weight)
        assert torch.equal(fn(l, name, m.weight), want)
    want = reference_masks(lm.model, reference_scores(lm.model, heads, sq=sq), 0.35)
    prune_model(lm.model, PruneConfig(method="cap", sparsity=0.35, cap_activation=True), head_scores=heads,
                calib=calib, batch_size=4)
    got = pruned_masks(lm.model)
    differ = sum(int((a ^ b).sum()) for a, b in zip(got, want))
    assert differ == 0


# ------------------------------------------------------------------ one threshold per layer
@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_per_layer_cap_prunes_every_layer_to_the_target(sparsity, one_thread):
    lm = tiny_random_model("gemma3", seed=5)
    layout = get_layout(lm.model)
    heads = _head_scores(layout)
    heads[0] += 5.0  # layer 0 holds the important heads: a global threshold would spare it
    want = reference_masks(lm.model, reference_scores(lm.model, heads), sparsity, per_layer=True)
    result = prune_model(lm.model, PruneConfig(method="cap", sparsity=sparsity, cap_scope="layer"), head_scores=heads)
    assert all(torch.equal(a, b) for a, b in zip(pruned_masks(lm.model), want))
    by_layer = result.report.groupby("layer")[["numel", "zeros"]].sum()
    for numel, zeros in by_layer.itertuples(index=False):
        assert abs(zeros - sparsity * numel) <= 1
    assert result.threshold is None


# ------------------------------------------------------------------ one budget per output row
def test_per_row_cap_prunes_the_lowest_scores_of_every_row(one_thread):
    lm = tiny_random_model("qwen2", seed=6)
    layout = get_layout(lm.model)
    heads = _head_scores(layout)
    scores = reference_scores(lm.model, heads)
    o_before = layout.attention(lm.model, 1).o_proj.weight.detach().clone()
    prune_model(lm.model, PruneConfig(method="cap", sparsity=0.4, cap_scope="row"), head_scores=heads)
    for (l, name, m), got in zip(layout.linear_weights(lm.model), pruned_masks(lm.model)):
        k = int(0.4 * m.in_features)
        assert got.sum(dim=1).eq(k).all(), (l, name)  # every row loses exactly int(in * s)
        score = scores[(l, name)]
        kept_min = score.masked_fill(got, float("inf")).min(dim=1).values
        pruned_max = score.masked_fill(~got, float("-inf")).max(dim=1).values
        assert (pruned_max <= kept_min).all(), (l, name)  # and they are its lowest scores
    o = layout.attention(lm.model, 1).o_proj.weight  # o_proj rows span every head: its factors reorder columns
    assert not torch.equal(o == 0, wanda_row_mask(o_before, torch.ones(o.shape[1]), 0.4))  # not magnitude per row


def test_activation_aware_per_row_cap_with_equal_factors_is_wanda_on_the_first_layer(calib, one_thread):
    """Factors all 1: Wanda's score and Wanda's row budget; layer 0 sees the same (dense) inputs in both."""
    dense = tiny_random_model("llama")
    layout = get_layout(dense.model)
    wanda = tiny_random_model("llama")
    prune_model(wanda.model, PruneConfig(method="wanda", sparsity=0.5), calib=calib, batch_size=4, progress=False)
    prune_model(dense.model, PruneConfig(method="cap", sparsity=0.5, cap_activation=True, cap_scope="row"),
                head_scores=torch.zeros(layout.num_layers, layout.num_heads), calib=calib, batch_size=4)
    pairs = list(zip(layout.linear_weights(dense.model), pruned_masks(dense.model), pruned_masks(wanda.model)))
    assert all(torch.equal(a, b) for (l, _, _), a, b in pairs if l == 0)
    assert not all(torch.equal(a, b) for (l, _, _), a, b in pairs)  # later layers: dense vs already-pruned inputs


# ------------------------------------------------------------------ mistakes
@pytest.mark.parametrize("kwargs, needle", [
    (dict(cap_mlp_factors="neurons"), "cap_mlp_factors='neurons'; allowed: layer_mean, neuron"),
    (dict(cap_scope="matrix"), "cap_scope='matrix'; allowed: global, layer, row"),
    (dict(cap_activation="yes"), "cap_activation='yes'; allowed: True, False"),
    (dict(method="wanda", cap_scope="layer"), "cap_scope='layer': a CAP variant, for method 'cap' only, not 'wanda'"),
    (dict(method="magnitude", cap_activation=True), "cap_activation=True: a CAP variant, for method 'cap' only"),
    (dict(method="random", cap_mlp_factors="neuron"), "cap_mlp_factors='neuron': a CAP variant, for method 'cap' only"),
    (dict(cap_scope="layer", nm=(2, 4)), "cap_scope='layer' with nm=2:4"),
    (dict(cap_scope="row", nm=(2, 4)), "cap_scope='row' with nm=2:4"),
])
def test_bad_variant_settings_are_refused_naming_them(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        PruneConfig(**{"method": "cap", **kwargs})


def test_prune_model_refuses_missing_or_misshapen_inputs(one_thread):
    lm = tiny_random_model("llama")
    layout = get_layout(lm.model)
    heads = _head_scores(layout)
    neuron = PruneConfig(method="cap", sparsity=0.3, cap_mlp_factors="neuron")
    with pytest.raises(ValueError, match="cap_mlp_factors='neuron' needs neuron_scores"):
        prune_model(lm.model, neuron, head_scores=heads)
    with pytest.raises(ValueError, match="2 neuron score tensors for 3 decoder layers"):
        prune_model(lm.model, neuron, head_scores=heads, neuron_scores=_neuron_scores(layout)[:2])
    with pytest.raises(ValueError, match=r"neuron scores of layer 0 have shape \(47,\); expected \(48,\)"):
        prune_model(lm.model, neuron, head_scores=heads, neuron_scores=[torch.zeros(47)] * 3)
    bad = _neuron_scores(layout)
    bad[2][9] = float("nan")
    with pytest.raises(ValueError, match="1 neuron score.*L2N9=nan"):
        prune_model(lm.model, neuron, head_scores=heads, neuron_scores=bad)
    with pytest.raises(ValueError, match="neuron_scores are used by method 'cap' with cap_mlp_factors='neuron' only"):
        prune_model(lm.model, PruneConfig(method="cap", sparsity=0.3), head_scores=heads,
                    neuron_scores=_neuron_scores(layout))
    with pytest.raises(ValueError, match="method 'cap' with cap_activation needs a calibration set"):
        prune_model(lm.model, PruneConfig(method="cap", sparsity=0.3, cap_activation=True), head_scores=heads)
    assert not any(bool((m.weight == 0).any()) for _, _, m in layout.linear_weights(lm.model))  # nothing pruned


# ------------------------------------------------------------------ command line
def test_cli_variant_flags_parse_with_the_papers_defaults():
    from cap_lab.cli import build_parser

    default = build_parser().parse_args(["prune", "--out", "x"])
    assert (default.cap_mlp_factors, default.cap_activation, default.cap_scope) == ("layer_mean", False, "global")
    args = build_parser().parse_args(["prune", "--out", "x", "--cap-mlp-factors", "neuron", "--cap-activation",
                                      "--cap-scope", "layer"])
    assert (args.cap_mlp_factors, args.cap_activation, args.cap_scope) == ("neuron", True, "layer")
    assert build_parser().parse_args(["prune", "--out", "x", "--cap-scope", "row"]).cap_scope == "row"


@pytest.mark.parametrize("args, needle", [
    (["--cap-scope", "matrix"], "argument --cap-scope: invalid choice: 'matrix'"),
    (["--cap-mlp-factors", "neurons"], "argument --cap-mlp-factors: invalid choice: 'neurons'"),
    (["--method", "wanda", "--cap-activation"], "cap_activation=True: a CAP variant, for method 'cap' only, not 'wanda'"),
    (["--nm", "2:4", "--cap-scope", "layer"], "cap_scope='layer' with nm=2:4"),
])
def test_cli_refuses_bad_variant_flags_in_one_line(args, needle, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CAP_LAB_DATA", str(data_dir))
    sparsity = [] if "--nm" in args else ["--sparsity", "0.3"]
    assert main(["prune", *sparsity, *args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cap-lab: error:") and needle in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_cli_prunes_with_every_variant_and_records_them(tiny_dir, data_dir, tmp_path, capsys, one_thread):
    out = tmp_path / "cap-variants"
    assert main(["prune", "--model", str(tiny_dir), "--data-dir", str(data_dir), "--calib-per-task", "2",
                 "--subsets", "2", "--max-length", "32", "--method", "cap", "--sparsity", "0.3",
                 "--cap-mlp-factors", "neuron", "--cap-activation", "--cap-scope", "layer", "--out", str(out)]) == 0
    info = read_prune_info(out)
    assert (info["cap_mlp_factors"], info["cap_activation"], info["cap_scope"]) == ("neuron", True, "layer")
    assert abs(info["achieved_sparsity"] - 0.3) < 1e-3
    meta = json.loads((out / "cap_lab.json").read_text())
    assert meta["neuron_scores"]["method"] == "attribution" and meta["neuron_scores"]["calibration"]["n_subsets"] == 2
    assert meta["activation_calibration"]["n_per_task"] == 2
