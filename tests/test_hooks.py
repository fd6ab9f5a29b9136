import pytest
import torch

from cap_lab.modeling import get_layout
from cap_lab.modeling import mask_heads
from cap_lab.models import TINY_ARCHS, tiny_random_model


def _ids(lm, texts=("hello world!", "abc")):
    return lm.tokenizer(list(texts), return_tensors="pt", padding=True)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_masking_one_head_equals_zeroing_its_o_proj_columns(arch):
    lm = tiny_random_model(arch)
    layout = get_layout(lm.model)
    batch = _ids(lm)
    layer, head, d = 1, 2, layout.head_dim
    mask = torch.ones(layout.num_heads)
    mask[head] = 0
    with torch.no_grad(), mask_heads(lm.model, {layer: mask}):
        hooked = lm.model(**batch).logits
    o_proj = layout.o_proj(lm.model, layer)
    with torch.no_grad():
        o_proj.weight[:, head * d:(head + 1) * d] = 0  # zeroing the input columns of that head
        by_hand = lm.model(**batch).logits
    torch.testing.assert_close(hooked, by_hand, rtol=0, atol=1e-6)


def test_all_ones_mask_changes_nothing(tiny):
    layout = get_layout(tiny.model)
    batch = _ids(tiny)
    with torch.no_grad():
        plain = tiny.model(**batch).logits
        with mask_heads(tiny.model, torch.ones(layout.num_layers, layout.num_heads)):
            ones = tiny.model(**batch).logits
        with mask_heads(tiny.model, {0: torch.ones(layout.num_heads)}):
            ones_dict = tiny.model(**batch).logits
    assert torch.equal(plain, ones) and torch.equal(plain, ones_dict)


def test_per_row_masks_only_touch_their_rows(tiny):
    layout = get_layout(tiny.model)
    batch = _ids(tiny, ("same text here", "same text here"))
    row_mask = torch.ones(2, layout.num_heads)
    row_mask[1, 0] = 0  # row 1 masks head 0, row 0 masks nothing
    with torch.no_grad():
        plain = tiny.model(**batch).logits
        with mask_heads(tiny.model, {1: row_mask}):
            mixed = tiny.model(**batch).logits
        with mask_heads(tiny.model, {1: row_mask[1]}):
            only_masked = tiny.model(**batch).logits
    assert torch.equal(mixed[0], plain[0])
    torch.testing.assert_close(mixed[1], only_masked[1], rtol=0, atol=1e-6)
    assert not torch.allclose(mixed[1], plain[1])


def test_hooks_removed_after_an_exception(tiny):
    layout = get_layout(tiny.model)
    o_proj = layout.o_proj(tiny.model, 0)
    with pytest.raises(RuntimeError, match="boom"):
        with mask_heads(tiny.model, {0: torch.zeros(layout.num_heads)}):
            assert len(o_proj._forward_pre_hooks) == 1
            raise RuntimeError("boom")
    assert len(o_proj._forward_pre_hooks) == 0
    with pytest.raises(ValueError):  # wrong batch rows: the forward raises inside the context
        with mask_heads(tiny.model, {0: torch.ones(3, layout.num_heads)}):
            tiny.model(**_ids(tiny))
    assert len(o_proj._forward_pre_hooks) == 0


def test_bad_masks_name_the_value(tiny):
    with pytest.raises(ValueError, match="layer 7"):
        with mask_heads(tiny.model, {7: torch.ones(4)}):
            pass
    with pytest.raises(ValueError, match=r"\(5,\)"):
        with mask_heads(tiny.model, {0: torch.ones(5)}):
            pass
