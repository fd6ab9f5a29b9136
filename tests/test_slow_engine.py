"""End to end on the real default model and the real data dir (slow; runs in CI)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from cap_lab.modeling import get_layout
from cap_lab.calibration import CalibrationConfig, build_calibration_set
from cap_lab.models import DEFAULT_MODEL, load_model
from cap_lab.pruning import PruneConfig, prune_model
from cap_lab.saving import read_prune_info, save_pruned
from cap_lab.scoring import head_scores

pytestmark = pytest.mark.slow


def test_score_prune_save_reload_on_the_default_model(real_data_dir, tmp_path):
    lm = load_model(DEFAULT_MODEL, device="cpu")
    assert lm.model.dtype == torch.float32
    calib = build_calibration_set(lm.tokenizer, CalibrationConfig(n_per_task=2, n_subsets=2, max_length=64), real_data_dir)
    assert calib.style == "chat" and len(calib.items) == 6
    dense = {k: v.clone() for k, v in lm.model.state_dict().items()}
    scores = head_scores(lm, calib, progress=False)
    assert scores.scores.shape == (30, 9) and torch.isfinite(scores.scores).all()
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in dense.items())
    again = head_scores(lm, calib, progress=False)  # served from the cache
    assert torch.equal(again.scores, scores.scores)

    for method in ("cap", "wanda"):
        lm.model.load_state_dict(dense)
        res = prune_model(lm.model, PruneConfig(method=method, sparsity=0.2), head_scores=scores.scores, calib=calib, progress=False)
        tol = 1e-4 if method == "cap" else 2e-3  # wanda prunes int(in * s) per row
        assert abs(res.achieved_sparsity - 0.2) <= tol, (method, res.achieved_sparsity)
        out = save_pruned(lm.model, lm.tokenizer, tmp_path / method, {"method": method, "achieved_sparsity": res.achieved_sparsity})
        back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        zeros = sum(int((m.weight == 0).sum()) for _, _, m in get_layout(back).linear_weights(back))
        assert zeros == round(res.achieved_sparsity * res.total)
        batch = lm.tokenizer(["Question: what is 2 + 3?"], return_tensors="pt")
        with torch.no_grad():
            assert torch.isfinite(back(**batch).logits).all()
        assert read_prune_info(out)["method"] == method
