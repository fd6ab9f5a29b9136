"""Pruned checkpoints in lm-evaluation-harness, and other tools' in-memory models in cap_lab.

A checkpoint written by :func:`cap_lab.saving.save_pruned` is a plain ``save_pretrained``
folder, so lm-eval's ``--model hf`` loads it with ``AutoModelForCausalLM.from_pretrained``
and nothing cap_lab-specific. These tests load one through lm-eval's ``HFLM`` (and its
``simple_evaluate``, what the ``lm_eval`` command calls) and require every zero kept and the
log-likelihoods cap_lab computes on the in-memory model. The lm-eval tests are skipped where
lm-eval is not installed (``pip install -e '.[lmeval]'``); the ``from_pretrained`` test
checks the same loading path without it.
"""
import json

import pytest
import torch

from cap_lab.evaluation import EvalSettings, continuation_logprobs, evaluate
from cap_lab.modeling import get_layout
from cap_lab.models import LoadedModel, load_model, tiny_config, tiny_random_model, tiny_tokenizer
from cap_lab.pruning import PruneConfig, prune_model, sparsity_report
from cap_lab.saving import save_pruned

NO_LM_EVAL = "lm_eval is not installed (pip install -e '.[lmeval]', or lm_eval>=0.4.13)"
PAIRS = [("Tom has 3 apples.", " 3"), ("Q: 2+2?", " A: 4"), ("Which object is the heaviest?", " object 2")]


def lm_eval_module(name: str):
    return pytest.importorskip(name, reason=NO_LM_EVAL)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny Llama pruned by magnitude to 50% and saved; ``(LoadedModel, PruneResult, folder)``.

    Module-scoped: the global magnitude threshold takes ~0.8 s even on a tiny model. Tests only read it.
    """
    lm = tiny_random_model("llama")
    result = prune_model(lm.model, PruneConfig("magnitude", 0.5))
    folder = save_pruned(lm.model, lm.tokenizer, tmp_path_factory.mktemp("lm_eval") / "pruned",
                         metadata=result.summary())
    return lm, result, folder


def zero_masks(model) -> dict[str, torch.Tensor]:
    return {f"{layer}.{name}": (m.weight == 0).cpu() for layer, name, m in get_layout(model).linear_weights(model)}


def cap_lab_logliks(lm: LoadedModel, pairs: list[tuple[str, str]]) -> list[float]:
    """log p(continuation | context) by cap_lab, split into tokens the way lm-eval splits a causal pair."""
    contexts, continuations = [], []
    for context, continuation in pairs:
        whole = lm.tokenizer(context + continuation).input_ids
        n_context = len(lm.tokenizer(context).input_ids)
        contexts.append(whole[:n_context])
        continuations.append(whole[n_context:])
    return continuation_logprobs(lm.model, contexts, continuations, pad_id=lm.tokenizer.pad_token_id)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_loads_the_way_lm_eval_loads_it(pruned, dtype):
    """HFLM's loading path (``from_pretrained`` with a dtype, no trust_remote_code) keeps every zero."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm, result, folder = pruned
    model = AutoModelForCausalLM.from_pretrained(folder, revision="main", dtype=dtype, trust_remote_code=False)
    AutoTokenizer.from_pretrained(folder, revision="main", trust_remote_code=False, use_fast=True)
    loaded, expected = zero_masks(model), zero_masks(lm.model)
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], v) for k, v in expected.items())
    report = sparsity_report(model)
    assert float(report["zeros"].sum() / report["numel"].sum()) == result.achieved_sparsity


def test_pruned_checkpoint_runs_in_lm_eval_hflm(pruned, one_thread):
    lm_eval_module("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm, result, folder = pruned
    hflm = HFLM(pretrained=str(folder), device="cpu", batch_size=1, dtype="float32")
    loaded, expected = zero_masks(hflm.model), zero_masks(lm.model)
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], v) for k, v in expected.items())  # every zero, only those
    report = sparsity_report(hflm.model)
    assert float(report["zeros"].sum() / report["numel"].sum()) == result.achieved_sparsity == pytest.approx(0.5, abs=1e-4)

    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    from_folder = [ll for ll, _ in hflm.loglikelihood(requests, disable_tqdm=True)]
    assert from_folder == pytest.approx(cap_lab_logliks(lm, PAIRS), rel=1e-5, abs=1e-5)
    in_memory = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=1)  # no save needed
    assert [ll for ll, _ in in_memory.loglikelihood(requests, disable_tqdm=True)] == pytest.approx(from_folder, abs=1e-5)


def test_lm_eval_parallelize_and_bfloat16_arguments(pruned, tmp_path, one_thread):
    """``parallelize=True`` (accelerate's device_map="auto"; with no GPU here it offloads to disk) and bfloat16."""
    lm_eval_module("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm, _, folder = pruned
    hflm = HFLM(pretrained=str(folder), device="cpu", batch_size=2, dtype="bfloat16", parallelize=True,
                offload_folder=str(tmp_path / "offload"))
    assert next(hflm.model.parameters()).dtype == torch.bfloat16
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    values = [ll for ll, _ in hflm.loglikelihood(requests, disable_tqdm=True)]
    assert values == pytest.approx(cap_lab_logliks(lm, PAIRS), rel=0.03)  # bfloat16 rounding


@pytest.mark.slow
def test_lm_eval_simple_evaluate_on_a_local_task(pruned, tmp_path, monkeypatch, one_thread):
    """The ``lm_eval --model hf --model_args pretrained=<folder>`` path, on a local multiple-choice task."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm_eval = lm_eval_module("lm_eval")
    from lm_eval.tasks import TaskManager

    lm, _, folder = pruned
    docs = [{"question": f"Which object {i} is the heaviest?", "choices": ["object 0", "object 1", "object 2"],
             "label": i % 3} for i in range(4)]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks/tiny_mc.yaml").write_text("\n".join([
        "task: cap_lab_tiny_mc", "dataset_path: json", "dataset_kwargs:", "  data_files:",
        f"    test: {tmp_path / 'test.jsonl'}", f"  cache_dir: {tmp_path / 'datasets'}", "test_split: test",
        "output_type: multiple_choice", 'doc_to_text: "{{question}}"', 'doc_to_choice: "{{choices}}"',
        'doc_to_target: "{{label}}"', "metric_list:", "  - metric: acc", "    aggregation: mean",
        "    higher_is_better: true", ""]))
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", tasks=["cap_lab_tiny_mc"],
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
                                  device="cpu", batch_size=2, log_samples=True)
    samples = sorted(out["samples"]["cap_lab_tiny_mc"], key=lambda s: s["doc_id"])
    expected = [cap_lab_logliks(lm, [(d["question"], " " + c) for c in d["choices"]]) for d in docs]  # " ": target_delimiter
    for sample, lls in zip(samples, expected):
        assert [float(r[0]) for r in sample["filtered_resps"]] == pytest.approx(lls, rel=1e-5, abs=1e-5)
    accuracy = sum(max(range(3), key=lls.__getitem__) == d["label"] for d, lls in zip(docs, expected)) / len(docs)
    assert out["results"]["cap_lab_tiny_mc"]["acc,none"] == pytest.approx(accuracy)


def test_evaluate_takes_an_in_memory_model_from_another_tool(data_dir, tmp_path, one_thread):
    """A model built and pruned without cap_lab, wrapped in a LoadedModel, evaluates like its saved copy."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    # not qwen2: transformers 5.23 reloads a saved qwen2 folder with Qwen2Tokenizer, which re-splits
    # the tiny character-level tokenizer's text differently (spaces are lost), so the copies would differ
    model = AutoModelForCausalLM.from_config(tiny_config("mistral"), dtype=torch.float32).eval()
    with torch.no_grad():  # "another tool" prunes half of every decoder matrix by magnitude, per matrix
        for name, p in model.named_parameters():
            if name.startswith("model.layers.") and p.dim() == 2:
                p.normal_(0.0, 0.2)
                p[p.abs() <= p.abs().flatten().kthvalue(p.numel() // 2).values] = 0
    lm = LoadedModel(model=model, tokenizer=tiny_tokenizer(), name="other-tool-mistral", source="memory")
    settings = EvalSettings(mode="loglik", limit=3, ppl_seqlen=16, ppl_windows=2, batch_size=2)
    results = evaluate(lm, ["arc_challenge", "wikitext2"], settings, data_dir=data_dir, out_dir=tmp_path / "runs",
                       progress=False)
    assert list(results) == ["arc_challenge", "wikitext2"]
    assert results["arc_challenge"].n == 3 and 0 <= results["arc_challenge"].value <= 1
    assert results["wikitext2"].value > 1 and results["arc_challenge"].sparsity == pytest.approx(0.5, abs=0.01)
    assert results["arc_challenge"].model["name"] == "other-tool-mistral"

    model.save_pretrained(tmp_path / "saved")
    lm.tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = evaluate(load_model(str(tmp_path / "saved"), device="cpu"), ["arc_challenge", "wikitext2"], settings,
                        data_dir=data_dir, out_dir=tmp_path / "runs-saved", progress=False)
    for task in results:
        assert reloaded[task].value == pytest.approx(results[task].value, rel=1e-6)
