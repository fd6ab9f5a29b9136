import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from cap_lab.cli import main
from cap_lab.models import tiny_random_model
from cap_lab.pruning import PruneConfig, prune_model
from cap_lab.saving import read_prune_info, save_pruned


def test_save_reload_keeps_zeros_and_config(tmp_path):
    lm = tiny_random_model("gemma3")
    res = prune_model(lm.model, PruneConfig(method="magnitude", sparsity=0.3))
    out = save_pruned(lm.model, lm.tokenizer, tmp_path / "pruned", {"method": "magnitude", "achieved_sparsity": res.achieved_sparsity})
    back = AutoModelForCausalLM.from_pretrained(out)
    for (k, a), (k2, b) in zip(sorted(lm.model.state_dict().items()), sorted(back.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
    assert back.config.to_dict()["layer_types"] == lm.model.config.to_dict()["layer_types"]
    info = read_prune_info(out)
    assert info["method"] == "magnitude" and "cap_lab_version" in info and "saved" in info
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    with pytest.raises(FileExistsError, match="pruned"):
        save_pruned(lm.model, lm.tokenizer, out)


def test_cli_score_then_prune_on_a_local_model(tiny_dir, data_dir, tmp_path, capsys):
    common = ["--model", str(tiny_dir), "--data-dir", str(data_dir), "--calib-per-task", "2", "--subsets", "2", "--max-length", "32"]
    assert main(["score", *common, "--out", str(tmp_path / "s.json")]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    assert len(scores["scores"]) == 3 and len(scores["scores"][0]) == 4
    assert scores["model"]["name"] == str(tiny_dir) and scores["model"]["dtype"] == "float32"
    assert scores["calibration"]["n_per_task"] == 2 and scores["method"] == "exact"
    assert "written to" in capsys.readouterr().out
    for method in ("cap", "wanda"):
        out = tmp_path / f"p-{method}"
        assert main(["prune", *common, "--method", method, "--sparsity", "0.2", "--scores", str(tmp_path / "s.json"), "--out", str(out)]) == 0
        info = read_prune_info(out)
        assert info["method"] == method and abs(info["achieved_sparsity"] - 0.2) < 0.02  # wanda floors int(in * s) per row
        assert info["source_model"] == {k: scores["model"][k] for k in ("name", "fingerprint")}
    cap = read_prune_info(tmp_path / "p-cap")
    assert cap["scores"]["file"] == str(tmp_path / "s.json") and cap["scores"]["model"] == scores["model"]
    assert cap["calibration"] == scores["calibration"] and cap["score_cache_key"] == scores["settings"]["key"]
    assert read_prune_info(tmp_path / "p-wanda")["scores"] is None  # --scores is not used by wanda (a warning says so)


@pytest.mark.parametrize("args, needle", [
    (["prune", "--sparsity", "1.5", "--out", "x"], "argument --sparsity: 1.5 is outside [0, 1)"),
    (["prune", "--sparsity", "0.2", "--method", "obd", "--out", "x"], "'obd'"),
    (["score", "--calib-per-task", "2", "--subsets", "3"], "n_per_task=2"),
    (["score", "--model", "./no-such-model", "--calib-per-task", "2", "--subsets", "2"], "no-such-model"),
])
def test_cli_bad_input_exits_nonzero_with_one_line(args, needle, data_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CAP_LAB_DATA", str(data_dir))
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cap-lab: error:") and needle in err and "\n" not in err and "Traceback" not in err
