"""The cost model of head scoring (cap_lab.costmodel) and ``cap-lab plan``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import random

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cap_lab.calibration import CalibrationConfig, CalibrationItem, CalibrationSet
from cap_lab.cli import plan
from cap_lab.costmodel import (
    BUILTIN_SHAPES, H100_CLASS, CalibrationShape, ModelShape, Throughput, exact_cost, exact_rank_costs, load_shape,
    predict, reference_cost, scoring_costs,
)
from cap_lab.models import tiny_config, tiny_random_model
from cap_lab.scoring import score_heads_reference
from cap_lab.scoring.attribution import score_heads_attribution
from cap_lab.scoring.exact import score_heads_exact

THROUGHPUT = Throughput(1e9, 1e8, "test")


def tiny_shape(arch: str = "llama", **overrides) -> ModelShape:
    return ModelShape.from_config(tiny_config(arch, **overrides), f"tiny-{arch}")


def test_flops_equal_a_hand_count_on_a_tiny_config():
    shape = tiny_shape()  # hidden 32, intermediate 48, 4 heads of 8, 2 KV heads, 3 layers, vocab 112
    assert shape.linear_flops == 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 48) == 15360
    assert shape.attention_flops == 4 * 4 * 8 and shape.lm_head_flops == 2 * 32 * 112
    assert shape.layers_flops(5) == 3 * (15360 * 5 + 128 * (1 + 2 + 3 + 4 + 5))
    calib = CalibrationShape(lengths=(3, 5), targets=(1, 2), batch_size=8)  # one batch: 2 rows of 5
    per_pass = 2 * (shape.layers_flops(5) + 5 * shape.lm_head_flops)
    ref = reference_cost(shape, calib)
    assert (ref.passes, ref.flops, ref.padded_tokens) == (13, 13 * per_pass, 10)
    assert ref.memory_bytes == 13 * 10 * 112 * (8 + 8)  # shifted copy, log-softmax
    assert ref.lm_head_flops == 13 * 10 * shape.lm_head_flops
    # exact, one chunk of 1 row (3 and 5 tokens pad more than 2%); then the 5-token chunk
    exact = 0
    for width, targets in ((3, 1), (5, 2)):
        suffix = [shape.layers_flops(width, first) for first in range(3)]
        exact += suffix[0] + targets * shape.lm_head_flops
        exact += sum(4 * (suffix[l] + targets * shape.lm_head_flops) for l in range(3))
        exact += (suffix[0] - suffix[1]) + (suffix[1] - suffix[2])
    assert exact_cost(shape, calib, verify_replay=False).flops == exact
    assert exact_cost(shape, calib).flops == exact + 2 * shape.layers_flops(3)


def test_sliding_windows_and_head_dim_come_from_the_config():
    shape = tiny_shape("gemma3")  # head_dim 16 (not 32 / 4), window 6 on layers 0 and 2
    assert shape.head_dim == 16 and shape.windows == (6, None, 6)
    assert shape.attention_pairs(0, 10) == (1 + 2 + 3 + 4 + 5 + 6) + 4 * 6
    assert shape.attention_pairs(1, 10) == 55 and shape.attention_pairs(0, 4) == 10


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3"])
def test_linear_flops_match_the_models_own_linear_layers(arch):
    lm = tiny_random_model(arch)
    layer = lm.model.model.layers[0]
    shape = ModelShape.from_config(lm.model.config)
    assert shape.linear_flops == sum(2 * m.in_features * m.out_features for m in layer.modules()
                                     if isinstance(m, nn.Linear))
    assert shape.lm_head_flops == 2 * lm.model.lm_head.in_features * lm.model.lm_head.out_features


class MatmulFlops(TorchDispatchMode):
    """Counts the FLOPs of every ``linear`` and ``mm`` the code under it runs (attention is not counted)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.linear.default:
            x, w = args[0], args[1]
            self.flops += 2 * x[..., 0].numel() * w.shape[0] * w.shape[1]
        elif func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            a, b = args[-2], args[-1]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


class NoAttention(ModelShape):
    attention_flops = 0


@pytest.mark.parametrize("method", ["reference", "exact", "attribution"])
def test_counted_flops_are_what_the_scorers_run(method, one_thread):
    """Every linear and matmul the scorer executes, counted at run time, equals the model's count."""
    lm = tiny_random_model("llama", num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    rng = random.Random(0)
    items = tuple(CalibrationItem(None, 0, j % 2, tuple(rng.randrange(4, 100) for _ in range(n)), start)
                  for j, (n, start) in enumerate([(9, 4), (12, 6), (7, 0), (12, 3), (5, 2)]))
    calib = CalibrationSet(CalibrationConfig(n_per_task=2, n_subsets=2), "plain", items, 0)
    scorer = {"reference": score_heads_reference, "exact": score_heads_exact,
              "attribution": score_heads_attribution}[method]
    with MatmulFlops() as counter:
        scorer(lm.model, calib, batch_size=3, progress=False)
    shape = ModelShape.from_config(lm.model.config)
    linear_only = NoAttention(**{f.name: getattr(shape, f.name) for f in dataclasses.fields(shape)})
    assert scoring_costs(linear_only, CalibrationShape.of(calib, batch_size=3))[method].flops == counter.flops


def test_exact_costs_less_than_reference_and_attribution_least():
    for shape in (tiny_shape(), tiny_shape("gemma3"), *BUILTIN_SHAPES.values()):
        calib = CalibrationShape.uniform(24, 64)
        costs = scoring_costs(shape, calib)
        assert costs["attribution"].flops < costs["exact"].flops < costs["reference"].flops, shape.name
        assert costs["exact"].memory_bytes < costs["reference"].memory_bytes


def test_ranks_share_the_exact_scorers_layers():
    shape, calib = tiny_shape(num_hidden_layers=6), CalibrationShape.uniform(8, 16)
    one = exact_cost(shape, calib)
    assert exact_rank_costs(shape, calib, 1) == [one]
    ranks = exact_rank_costs(shape, calib, 2)
    assert sum(r.passes - 1 for r in ranks) == one.passes - 1  # every head masked on exactly one rank
    assert one.flops / 2 < max(r.flops for r in ranks) < one.flops  # each rank also captures every chunk


def test_predicted_time_scales_with_work_and_throughput():
    shape, calib = tiny_shape(), CalibrationShape.uniform(16, 32)
    base = predict(shape, calib, THROUGHPUT, verify_replay=False)
    faster = predict(shape, calib, Throughput(2e9, 2e8), verify_replay=False)
    double = predict(shape, CalibrationShape.uniform(32, 32), THROUGHPUT, verify_replay=False)
    for m in base:
        assert base[m].seconds == pytest.approx(base[m].cost.flops / 1e9 + base[m].cost.memory_bytes / 1e8)
        assert faster[m].seconds == pytest.approx(base[m].seconds / 2)
        assert double[m].seconds == pytest.approx(2 * base[m].seconds)  # twice the items, same batches
    # the logit term grows with the vocabulary, and soft-capping adds three passes
    big_vocab = dataclasses.replace(shape, vocab_size=4 * shape.vocab_size)
    assert predict(big_vocab, calib, THROUGHPUT)["reference"].memory_s == pytest.approx(4 * base["reference"].memory_s)
    capped = dataclasses.replace(shape, logit_softcapping=True)
    assert predict(capped, calib, THROUGHPUT)["reference"].memory_s > 1.5 * base["reference"].memory_s
    # 16-bit logits move fewer bytes except where they are upcast
    assert predict(shape, calib, THROUGHPUT, dtype_bytes=2)["exact"].memory_s > 0


def test_paper_profile_on_an_h100_class_device_takes_hours_not_days():
    calib = CalibrationShape.uniform(384, 512)  # 128 per task x 3 tasks, every item at the cap
    p = predict(BUILTIN_SHAPES["llama-3-8b"], calib, H100_CLASS, dtype_bytes=2)
    assert 0.1 < p["exact"].seconds / 3600 < p["reference"].seconds / 3600 < 10
    assert p["exact"].cost.passes == 1 + 32 * 32


def test_bad_values_raise_value_errors_naming_them():
    with pytest.raises(ValueError, match="batch_size=0"):
        CalibrationShape((4,), (2,), batch_size=0)
    with pytest.raises(ValueError, match="flops_per_s=0"):
        Throughput(0, 1)
    with pytest.raises(ValueError, match="no-such-model"):
        load_shape("./no-such-model")


def test_load_shape_reads_a_config_file(tmp_path):
    folder = tmp_path / "m"
    tiny_config("gemma3").save_pretrained(folder)
    assert load_shape(str(folder)) == dataclasses.replace(tiny_shape("gemma3"), name=str(folder))
    other = tmp_path / "gemma.json"
    other.write_text(json.dumps(json.loads((folder / "config.json").read_text())))
    assert load_shape(str(other)).windows == (6, None, 6)
    assert load_shape("llama-3-8b") is BUILTIN_SHAPES["llama-3-8b"]


def plan_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    plan.add_parser(parser.add_subparsers())
    return parser.parse_args(["plan", *argv])


def test_plan_prints_the_table(tmp_path, capsys):
    folder = tmp_path / "m"
    tiny_config("llama").save_pretrained(folder)
    args = plan_args("--model", str(folder), "--assume-length", "64", "--calib-per-task", "4",
                     "--tflops", "0.000001", "--bandwidth-gbs", "0.001", "--processes", "2")
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "3 layers x 4 heads (2 KV, head_dim 8)" in out and "ASSUMED 64 tokens per item" in out
    assert "given: 1e-06 TFLOP/s, 0.001 GB/s" in out and "assumptions:" in out
    assert "exact on 2 ranks" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if len(line.split()) == 8 and line.split()[0] in ("reference", "exact", "attribution")}
    assert set(rows) == {"reference", "exact", "attribution"}
    expected = predict(tiny_shape(), CalibrationShape.uniform(12, 64), Throughput(1e6, 1e6), dtype_bytes=2)
    for method, row in rows.items():  # total seconds at 1 MFLOP/s and 1 MB/s
        assert float(row[-2]) == pytest.approx(expected[method].seconds, rel=1e-4)


def test_plan_refuses_half_a_throughput():
    args = plan_args("--model", "llama-3-8b", "--assume-length", "16", "--tflops", "100")
    with pytest.raises(ValueError, match="--bandwidth-gbs"):
        args.run(args)
