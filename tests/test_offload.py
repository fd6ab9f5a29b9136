"""Layer-by-layer execution (cap_lab.modeling.offload): same masks, one layer at a time, model unchanged.

On a CPU-only machine the execution device is the CPU too, so no tensor really moves: these
tests then check the bookkeeping (which layers the onloader holds while each layer runs) and
that the results are those of the all-in-memory path. Where CUDA exists, the same tests run
with ``cuda`` as the execution device and check real parameter devices as well.
"""
from contextlib import contextmanager

import pytest
import torch

from cap_lab.calibration import CalibrationConfig, build_calibration_set
from cap_lab.modeling import capture, get_layout, onload_layers
from cap_lab.models import TINY_ARCHS, tiny_random_model
from cap_lab.pruning import PruneConfig, prune_model

from conftest import same_state, spy_on_onloaders, state_copy

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # no GPU here when this was written


def hook_counts(model) -> list[tuple[int, int, int]]:
    return [(len(m._forward_pre_hooks), len(m._forward_hooks), len(m._forward_hooks_always_called))
            for m in model.modules()]


def tensor_devices(model) -> dict[str, torch.device]:
    return {n: t.device for n, t in list(model.named_parameters()) + list(model.named_buffers())}


@contextmanager
def watch_layers(model, layout, onloaders: list):
    """Record, while each decoder layer runs, which layers the onloader holds and where they are."""
    seen = []
    layers = layout.layers(model)

    def hook(index):
        def record(module, args, out):  # registered before onload_layers' hook: the layer is still held
            onloader = onloaders[-1]
            on_device = [i for i, layer in enumerate(layers)
                         if any(p.device == onloader.device for p in layer.parameters())]
            seen.append((index, onloader.resident, on_device))
        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_layer_by_layer_wanda_equals_all_in_memory(arch, device, data_dir, monkeypatch, one_thread):
    in_memory, layered = tiny_random_model(arch), tiny_random_model(arch)
    calib = build_calibration_set(in_memory.tokenizer, CalibrationConfig(n_per_task=2, n_subsets=2, max_length=40),
                                  data_dir)
    in_memory.model.to(device)
    expected = prune_model(in_memory.model, PruneConfig("wanda", 0.5), calib=calib, batch_size=4, progress=False)

    layout = get_layout(layered.model)
    devices, hooks = tensor_devices(layered.model), hook_counts(layered.model)
    onloaders = spy_on_onloaders(monkeypatch)
    with watch_layers(layered.model, layout, onloaders) as seen:
        result = prune_model(layered.model, PruneConfig("wanda", 0.5), calib=calib, batch_size=4, progress=False,
                             execution_device=device)

    # (a) the same pruned weights, bit for bit
    assert result.selected == expected.selected and result.achieved_sparsity == expected.achieved_sparsity
    expected_state = {k: v.cpu() for k, v in in_memory.model.state_dict().items()}
    assert same_state(state_copy(layered.model), expected_state)
    # (b) while each layer ran, it alone was held (and, on a real device, it alone was there)
    (onloader,) = onloaders
    assert onloader.peak_resident == 1
    batches = 2  # 6 calibration items, batch_size 4
    assert len(seen) >= layout.num_layers * batches * 3  # intact pass, statistics, pruned replay
    for index, resident, on_device in seen:
        assert resident == (index,), (index, resident)
        if torch.device(device).type != "cpu":
            assert on_device == [index], (index, on_device)
    assert onloader.onloads >= layout.num_layers * (batches + 1)  # per batch in the intact pass, then held once
    # (c) nothing else changed: every tensor where it was, no hook left, ordinary parameters
    assert tensor_devices(layered.model) == devices and hook_counts(layered.model) == hooks
    assert not any(p.is_inference() for p in layered.model.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_captured_layer_arguments_are_on_the_execution_device(device, one_thread):
    lm = tiny_random_model("gemma3")  # sliding and full attention layers, two rotary embeddings
    layout = get_layout(lm.model)
    before, devices, hooks = state_copy(lm.model), tensor_devices(lm.model), hook_counts(lm.model)
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    reference = capture(lm.model, layout, ids, mask)
    with onload_layers(lm.model, layout, device) as onloader:
        assert onloader.resident == ()
        assert lm.model.get_input_embeddings().weight.device == onloader.device
        captured = capture(lm.model, layout, ids.to(onloader.device), mask.to(onloader.device))
    tensors = [captured.hidden, captured.final]
    for kwargs in captured.layer_kwargs:
        for value in kwargs.values():
            tensors += [value] if isinstance(value, torch.Tensor) else list(value) if isinstance(value, tuple) else []
    assert len(tensors) > 2 + layout.num_layers  # masks and rotary (cos, sin) were captured
    assert {t.device for t in tensors} == {onloader.device}
    assert onloader.peak_resident == 1 and onloader.resident == ()
    if onloader.device.type == "cpu":  # the same computation, in the same place
        assert torch.equal(captured.final, reference.final)
    else:  # GPU kernels round differently
        torch.testing.assert_close(captured.final.cpu(), reference.final, rtol=1e-3, atol=1e-3)
    assert same_state(state_copy(lm.model), before)
    assert tensor_devices(lm.model) == devices and hook_counts(lm.model) == hooks


def test_everything_is_restored_when_the_block_raises(tiny):
    layout = get_layout(tiny.model)
    before, hooks = state_copy(tiny.model), hook_counts(tiny.model)
    with pytest.raises(KeyError, match="inside"):
        with onload_layers(tiny.model, layout, "cpu") as onloader:
            with onloader.hold(1):
                assert onloader.resident == (1,)
                raise KeyError("inside")
    assert onloader.resident == () and hook_counts(tiny.model) == hooks and same_state(state_copy(tiny.model), before)
    with onload_layers(tiny.model, layout, "cpu"):  # usable again
        pass


def test_holding_a_layer_keeps_it_across_forwards(tiny):
    layout = get_layout(tiny.model)
    ids = torch.tensor([[1, 5, 6, 7]])
    with onload_layers(tiny.model, layout, "cpu") as onloader:
        with onloader.hold(2):
            tiny.model(input_ids=ids)
            assert onloader.resident == (2,)
        assert onloader.resident == ()
    # layers 0 and 1 came and went; layer 2 stayed for the whole forward (moved once, by the hold)
    assert onloader.onloads == 3 and onloader.peak_resident == 2


def test_refused_placements(tiny):
    layout = get_layout(tiny.model)
    with pytest.raises(ValueError, match="meta"):
        with onload_layers(tiny.model, layout, "meta"):
            pass
    with onload_layers(tiny.model, layout, "cpu") as onloader:
        with pytest.raises(ValueError, match="already active"):
            with onload_layers(tiny.model, layout, "cpu"):
                pass
        with pytest.raises(ValueError, match="out of range"):
            with onloader.hold(layout.num_layers):
                pass
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            with onload_layers(tiny.model, layout, "cuda"):
                pass


def test_a_failed_move_leaves_the_model_whole(tiny, monkeypatch):
    """A layer that cannot be moved (device out of memory) fails its forward; nothing stays half-moved."""
    import cap_lab.modeling.offload as offload

    layout = get_layout(tiny.model)
    before, hooks = state_copy(tiny.model), hook_counts(tiny.model)
    real, layer_1 = offload._place, layout.layers(tiny.model)[1]

    def place(owners, device, moved):
        real(owners, device, moved)
        if owners and owners[0] is layer_1:
            raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(offload, "_place", place)
    with onload_layers(tiny.model, layout, "cpu") as onloader:
        with pytest.raises(RuntimeError, match="simulated"):
            tiny.model(input_ids=torch.tensor([[1, 5, 6]]))
        assert onloader.resident == ()
    assert hook_counts(tiny.model) == hooks and same_state(state_copy(tiny.model), before)
