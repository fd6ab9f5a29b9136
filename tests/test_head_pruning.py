"""Structural (head-level) CAP, ``cap_heads`` (paper Sec. 6): whole heads removed by causal score.

Masks are checked against the definition written out the obvious way: which q rows, o columns
and k/v rows must be zero for hand-made scores, and the MLP's lowest CAP scores by one sort.
"""
import pytest
import torch

from cap_lab.cli import build_parser, main
from cap_lab.head_pruning import heads_to_remove
from cap_lab.modeling import get_layout
from cap_lab.models import tiny_random_model
from cap_lab.pruning import PruneConfig, prune_model

MLP = ("gate_proj", "up_proj", "down_proj")


def _scores(layout, lowest=(), seed=0):
    """Random scores in [1, 2) except ``lowest``, which get 0, -1, -2, ... in the order given (first = lowest)."""
    s = 1 + torch.rand(layout.num_layers, layout.num_heads, generator=torch.Generator().manual_seed(seed))
    for rank, (l, h) in enumerate(lowest):
        s[l, h] = -float(len(lowest) - rank)
    return s


def expected_attention_zeros(layout, removed: set) -> dict:
    """{(layer, projection): (out, in) bool} of the definition, written head by head."""
    d, g, out = layout.head_dim, layout.group_size, {}
    for l in range(layout.num_layers):
        q = torch.zeros(layout.num_heads * d, dtype=torch.bool)
        kv = torch.zeros(layout.num_kv_heads * d, dtype=torch.bool)
        for h in range(layout.num_heads):
            q[h * d:(h + 1) * d] = (l, h) in removed
        for k in range(layout.num_kv_heads):
            kv[k * d:(k + 1) * d] = all((l, h) in removed for h in range(k * g, (k + 1) * g))
        out[(l, "q_proj")], out[(l, "o_proj")] = q.view(-1, 1), q.view(1, -1)
        out[(l, "k_proj")] = out[(l, "v_proj")] = kv.view(-1, 1)
    return out


def check_attention(model, layout, removed: set) -> None:
    expected = expected_attention_zeros(layout, removed)
    for l, name, m in layout.linear_weights(model):
        if name not in MLP:
            assert torch.equal(m.weight == 0, expected[(l, name)].expand_as(m.weight)), (l, name)


@pytest.mark.parametrize("arch, overrides", [("llama", {}), ("llama", {"num_key_value_heads": 4}), ("gemma3", {})])
def test_the_lowest_heads_go_first_with_exactly_their_rows_and_columns(arch, overrides, one_thread):
    lm = tiny_random_model(arch, **overrides)
    layout = get_layout(lm.model)
    lowest = [(0, 1), (2, 3), (0, 0), (1, 2)]  # ranks 0..3
    per_head = 2 * layout.head_dim * 32  # q rows + o columns of one head (hidden 32)
    total = per_head * layout.num_layers * layout.num_heads
    s = 0.2  # round(0.2 * total) needs ceil(0.2 * 12) = 3 heads
    assert -(-round(s * total) // per_head) == 3
    res = prune_model(lm.model, PruneConfig(method="cap_heads", sparsity=s), head_scores=_scores(layout, lowest))
    removed = set(lowest[:3])
    check_attention(lm.model, layout, removed)
    assert {tuple(x) for x in res.removed_heads.nonzero().tolist()} == removed
    assert res.summary()["removed_heads"] == res.removed_heads.int().tolist()
    assert torch.isfinite(lm.model(torch.tensor([[1, 5, 9, 13, 17, 21]])).logits).all()


def test_kv_rows_go_only_with_their_whole_group(one_thread):
    lm = tiny_random_model("llama")  # 4 query heads share 2 kv heads: groups {0, 1} and {2, 3}
    layout = get_layout(lm.model)
    assert layout.group_size == 2
    lowest = [(1, 0), (2, 2), (1, 1), (0, 3), (2, 0)]  # layer 1 loses group 0; layers 0 and 2 lose no group
    s = 5 / 12 - 1e-3  # five heads
    prune_model(lm.model, PruneConfig(method="cap_heads", sparsity=s), head_scores=_scores(layout, lowest))
    check_attention(lm.model, layout, set(lowest))
    k = layout.attention(lm.model, 1).k_proj.weight
    assert bool((k[:8] == 0).all()) and not bool((k[8:] == 0).any())
    assert not bool((layout.attention(lm.model, 2).v_proj.weight == 0).any())


@pytest.mark.parametrize("s", [0.1, 0.3, 0.5])
def test_mlp_sparsity_is_exactly_s_with_caps_lowest_scores(s, one_thread):
    lm = tiny_random_model("llama")
    layout = get_layout(lm.model)
    heads = _scores(layout, seed=3)
    mlp = [(l, n, m) for l, n, m in layout.linear_weights(lm.model) if n in MLP]
    factors = 1 + 9 * (heads - heads.min()) / (heads.max() - heads.min())  # Eq. 3
    scores = torch.cat([(m.weight.abs() * factors[l].mean()).flatten() for l, _, m in mlp])  # Eq. 4, layer mean
    n = scores.numel()
    expected = torch.zeros(n, dtype=torch.bool)
    expected[torch.sort(scores).indices[:round(s * n)]] = True
    res = prune_model(lm.model, PruneConfig(method="cap_heads", sparsity=s), head_scores=heads)
    zeros = torch.cat([(m.weight == 0).flatten() for _, _, m in mlp])
    assert int(zeros.sum()) == round(s * n)
    assert torch.equal(zeros, expected)
    attn = [m for _, name, m in layout.linear_weights(lm.model) if name in ("q_proj", "o_proj")]
    qo = sum(int((m.weight == 0).sum()) for m in attn) / sum(m.weight.numel() for m in attn)
    assert s <= qo < s + 2 / 12  # whole heads: at least the budget, less than one head over
    assert abs(res.achieved_sparsity - s) < 0.1  # close, not exact (whole heads, k/v rows)
    report = res.report
    assert res.achieved_sparsity == float(report["zeros"].sum() / report["numel"].sum())
    assert torch.isfinite(lm.model(torch.tensor([[1, 5, 9, 13]])).logits).all()


def test_removal_is_nested_in_sparsity_and_follows_the_scores():
    layout = get_layout(tiny_random_model("llama").model)
    scores = _scores(layout, seed=7)
    sizes = torch.full((layout.num_layers, layout.num_heads), 512)
    previous = torch.zeros_like(scores, dtype=torch.bool)
    for s in (0.0, 0.05, 0.2, 0.5, 0.9):
        removed = heads_to_remove(scores, layout, sizes, s)
        assert int(removed.sum()) == -(-round(s * 6144) // 512)
        assert bool((removed | ~previous).all())  # nested
        if removed.any() and (~removed).any():
            assert float(scores[removed].max()) <= float(scores[~removed].min())
        previous = removed


def test_zero_sparsity_removes_nothing(one_thread):
    lm = tiny_random_model("llama")
    layout = get_layout(lm.model)
    res = prune_model(lm.model, PruneConfig(method="cap_heads", sparsity=0.0), head_scores=_scores(layout))
    assert res.achieved_sparsity == 0.0 and not bool(res.removed_heads.any())


@pytest.mark.parametrize("kwargs, needle", [
    (dict(nm=(2, 4)), "method 'cap_heads' with nm=2:4"),
    (dict(owl=True), "method 'cap_heads' with owl=True"),
    (dict(cap_scope="layer"), "a CAP variant, for method 'cap' only, not 'cap_heads'"),
    (dict(cap_activation=True), "a CAP variant, for method 'cap' only, not 'cap_heads'"),
])
def test_bad_options_are_refused_naming_them(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        PruneConfig(**{"method": "cap_heads", "sparsity": None if "nm" in kwargs else 0.3, **kwargs})


def test_missing_or_bad_scores_are_refused_before_any_pruning(one_thread):
    lm = tiny_random_model("llama")
    layout = get_layout(lm.model)
    config = PruneConfig(method="cap_heads", sparsity=0.3)
    with pytest.raises(ValueError, match="method 'cap_heads' needs head_scores"):
        prune_model(lm.model, config)
    with pytest.raises(ValueError, match=r"head_scores shape \(3, 3\)"):
        prune_model(lm.model, config, head_scores=torch.zeros(3, 3))
    bad = _scores(layout)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="L1H2=nan"):
        prune_model(lm.model, config, head_scores=bad)
    assert not any(bool((m.weight == 0).any()) for _, _, m in layout.linear_weights(lm.model))


# ------------------------------------------------------------------ command line
def test_cli_parses_cap_heads_and_calib_source():
    default = build_parser().parse_args(["prune", "--out", "x"])
    assert (default.method, default.calib_source) == ("cap", "reasoning")
    args = build_parser().parse_args(["prune", "--out", "x", "--method", "cap_heads", "--calib-source", "wikitext2"])
    assert (args.method, args.calib_source) == ("cap_heads", "wikitext2")


@pytest.mark.parametrize("args, needle", [
    (["--method", "cap_heads", "--nm", "2:4"], "method 'cap_heads' with nm=2:4"),
    (["--method", "cap_heads", "--sparsity", "0.3", "--owl"], "method 'cap_heads' with owl=True"),
    (["--method", "cap_heads", "--sparsity", "0.3", "--cap-scope", "layer"], "for method 'cap' only, not 'cap_heads'"),
    (["--sparsity", "0.3", "--calib-source", "c4"], "argument --calib-source: invalid choice: 'c4'"),
])
def test_cli_refuses_bad_flags_in_one_line(args, needle, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CAP_LAB_DATA", str(data_dir))
    assert main(["prune", *args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cap-lab: error:") and needle in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_cli_prunes_heads_with_wikitext2_scores_and_records_both(tiny_dir, data_dir, tmp_path, capsys, monkeypatch,
                                                                 one_thread):
    import cap_lab.calibration as calibration
    from cap_lab.saving import read_prune_info

    monkeypatch.setattr(calibration, "WIKITEXT2_EVAL_TOKENS", 300)  # the fixture's corpus is ~1,500 tokens
    out = tmp_path / "heads"
    assert main(["prune", "--model", str(tiny_dir), "--data-dir", str(data_dir), "--calib-per-task", "2",
                 "--subsets", "2", "--max-length", "16", "--calib-source", "wikitext2", "--method", "cap_heads",
                 "--sparsity", "0.3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    info = read_prune_info(out)
    assert info["method"] == "cap_heads" and info["calibration"]["source"] == "wikitext2"
    assert sum(map(sum, info["removed_heads"])) == 4  # ceil(0.3 * 12) heads
    assert "cap_heads: removed 4 of 12 heads" in printed
    assert abs(info["achieved_sparsity"] - 0.3) < 0.1
