"""The modeling layer: replay checked by value and self-verified, the LM head written once."""
import pytest
import torch
import transformers

from cap_lab.calibration import CalibrationConfig, build_calibration_set
from cap_lab.modeling import (
    ReplayError, TargetTokens, capture, decoder_forward, get_layout, lm_logits, run_layers, target_loss_sums,
    token_logprobs,
)
from cap_lab.modeling import replay
from cap_lab.models import TINY_ARCHS, tiny_random_model
from cap_lab.scoring.reference import label_loss_sums


def _batch(lm, data_dir):
    calib = build_calibration_set(lm.tokenizer, CalibrationConfig(n_per_task=2, n_subsets=2, max_length=24), data_dir)
    return next(calib.batches(list(range(4)), 4))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_replay_in_two_pieces_reproduces_the_forward(arch, data_dir, one_thread):
    lm = tiny_random_model(arch, seed=4)
    layout, batch = get_layout(lm.model), _batch(lm, data_dir)
    with torch.no_grad():
        cap = capture(lm.model, layout, batch.input_ids, batch.attention_mask)
        middle = run_layers(lm.model, layout, cap.hidden, 0, 2, cap.layer_kwargs)
        final = run_layers(lm.model, layout, middle.repeat(3, 1, 1), 2, layout.num_layers, cap.layer_kwargs,
                           batch_rows=batch.input_ids.shape[0])  # three stacked copies
    rows = batch.input_ids.shape[0]
    for k in range(3):
        torch.testing.assert_close(final[k * rows:(k + 1) * rows], cap.final, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("start", [0, 2])
def test_a_capture_that_skips_the_layers_records_the_same_arguments(arch, start, data_dir, one_thread):
    lm = tiny_random_model(arch, seed=4)
    layout, batch = get_layout(lm.model), _batch(lm, data_dir)
    layers = layout.layers(lm.model)
    skipped = {}  # layer -> whether its output is its input, object for object

    def record(i):
        return lambda m, args, out: skipped.__setitem__(i, (out if isinstance(out, torch.Tensor) else out[0]) is args[0])

    handles = [layer.register_forward_hook(record(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            full = capture(lm.model, layout, batch.input_ids, batch.attention_mask, start)  # first: computes, verifies
            assert not any(skipped.values())
            quick = capture(lm.model, layout, batch.input_ids, batch.attention_mask, start, compute=False)
    finally:
        for h in handles:
            h.remove()
    assert [skipped[i] for i in range(layout.num_layers)] == [i >= max(start, 1) for i in range(layout.num_layers)]
    assert quick.final is None and full.final is not None
    torch.testing.assert_close(quick.hidden, full.hidden, atol=0, rtol=0)
    for mine, theirs in zip(quick.layer_kwargs, full.layer_kwargs):
        assert mine.keys() == theirs.keys()
        for name, value in mine.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, theirs[name], atol=0, rtol=0)
    assert all("forward" not in vars(layer) for layer in layers)  # the class's forward is back
    with torch.no_grad():  # the recorded arguments replay to the full capture's final states
        out = run_layers(lm.model, layout, quick.hidden, start, layout.num_layers, quick.layer_kwargs)
    torch.testing.assert_close(out, full.final, atol=1e-5, rtol=0)


def test_a_skipping_capture_computes_when_the_model_is_not_verified_yet(data_dir, one_thread):
    lm = tiny_random_model("llama", seed=5)
    layout, batch = get_layout(lm.model), _batch(lm, data_dir)
    with torch.no_grad():
        cap = capture(lm.model, layout, batch.input_ids, batch.attention_mask, compute=False)
    assert cap.final is not None and lm.model in replay._VERIFIED


def test_a_new_keyword_argument_is_replayed_untouched(tiny, data_dir, one_thread):
    """A release that passes layers an argument cap_lab has never heard of needs no change."""
    layout, batch = get_layout(tiny.model), _batch(tiny, data_dir)
    seen = []

    def add_future_argument(module, args, kwargs):
        seen.append(kwargs.get("future_state"))
        return args, dict(kwargs, future_state=torch.ones(batch.input_ids.shape[0], 5))

    handles = [layer.register_forward_pre_hook(add_future_argument, with_kwargs=True)
               for layer in layout.layers(tiny.model)]
    try:
        with torch.no_grad():
            cap = capture(tiny.model, layout, batch.input_ids, batch.attention_mask)
            again = run_layers(tiny.model, layout, cap.hidden.repeat(2, 1, 1), 0, layout.num_layers, cap.layer_kwargs,
                               batch_rows=batch.input_ids.shape[0])
    finally:
        for h in handles:
            h.remove()
    assert cap.layer_kwargs[0]["future_state"].shape == (batch.input_ids.shape[0], 5)
    torch.testing.assert_close(again[: batch.input_ids.shape[0]], cap.final, atol=1e-5, rtol=0)


def test_values_that_cannot_be_replayed_are_refused():
    from transformers import DynamicCache

    x = torch.zeros(1, 3, 8)
    replay.check_layer_call(0, (x,), {"attention_mask": None, "shared_kv_states": torch.ones(2), "flag": False})
    version = f"transformers {transformers.__version__}"
    with pytest.raises(ReplayError, match=f"KV cache object in 'cache'.*{version}"):
        replay.check_layer_call(0, (x,), {"cache": DynamicCache()})
    with pytest.raises(ReplayError, match="asked to use a cache"):
        replay.check_layer_call(0, (x,), {"use_cache": True})
    with pytest.raises(ReplayError, match="'attention_mask' of type dict"):
        replay.check_layer_call(0, (x,), {"attention_mask": {"full_attention": None}})
    with pytest.raises(ReplayError, match="positional arguments"):
        replay.check_layer_call(0, (x, x), {})


def test_a_layer_that_replays_differently_fails_the_self_check(data_dir, one_thread):
    lm = tiny_random_model("llama", seed=5)
    layout, batch = get_layout(lm.model), _batch(lm, data_dir)
    calls = []

    def drift(module, args, output):  # the model's own call is the first: later calls differ
        calls.append(1)
        return output * (1.0 if len(calls) == 1 else 1.01)

    handle = layout.layers(lm.model)[1].register_forward_hook(drift)
    try:
        with pytest.raises(ReplayError, match=f"differ from its own forward.*transformers {transformers.__version__}"):
            with torch.no_grad():
                capture(lm.model, layout, batch.input_ids, batch.attention_mask)
    finally:
        handle.remove()
    assert lm.model not in replay._VERIFIED


def test_the_self_check_runs_once_per_model(tiny, data_dir, one_thread):
    layout, batch = get_layout(tiny.model), _batch(tiny, data_dir)
    calls = []
    handle = layout.layers(tiny.model)[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            capture(tiny.model, layout, batch.input_ids, batch.attention_mask)
            first = len(calls)
            capture(tiny.model, layout, batch.input_ids, batch.attention_mask)
    finally:
        handle.remove()
    assert first == 2 and len(calls) == 3  # forward + replay, then forward only


def test_target_loss_from_pre_norm_states_equals_full_logits(data_dir, one_thread):
    lm = tiny_random_model("gemma3", seed=0, final_logit_softcapping=2.0)
    layout, batch = get_layout(lm.model), _batch(lm, data_dir)
    rows = batch.input_ids.shape[0]
    with torch.no_grad():
        want, _ = label_loss_sums(lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                  batch.labels)
        cap = capture(lm.model, layout, batch.input_ids, batch.attention_mask)
        got = target_loss_sums(lm.model, layout, cap.final.repeat(2, 1, 1), TargetTokens.from_labels(batch.labels),
                               rows, max_rows=7)
    assert got.shape == (2, rows)
    torch.testing.assert_close(got, torch.stack([want, want]), atol=1e-4, rtol=1e-6)


def test_lm_head_and_logprobs_equal_the_models_own_forward(one_thread):
    lm = tiny_random_model("gemma3", seed=1, final_logit_softcapping=3.0)
    layout = get_layout(lm.model)
    ids = torch.randint(4, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = lm.model(input_ids=ids).logits[0]  # (T, V)
        normed, cache = decoder_forward(lm.model, layout, ids)
        logp = token_logprobs(lm.model, layout, normed[0, :-1], ids[0, 1:], max_rows=5)
    assert cache is None
    torch.testing.assert_close(lm_logits(lm.model, layout, normed[0]), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logp, torch.log_softmax(want[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0],
                               atol=1e-5, rtol=1e-5)
