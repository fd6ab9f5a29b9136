"""Saved runs, seeded subsets, ``evaluate`` and ``cap-lab eval`` on tiny models and a tiny data dir."""
import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cap_lab.cli import main
from cap_lab.data import Example
from cap_lab.evaluation import EVAL_TASKS, EvalSettings, cot_accuracy, evaluate, read_records, results_table
from cap_lab.evaluation.runner import parse_tasks
from cap_lab.evaluation.subsets import select_examples
from cap_lab.models import tiny_random_model
from cap_lab.saving import save_pruned


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


@pytest.fixture
def data_dir(tmp_path):
    """A data dir in the real layout with a few hand-written questions per task."""
    root = tmp_path / "data"
    for sub in ("gsm8k", "strategyqa", "arc_challenge", "wikitext2_raw"):
        (root / sub).mkdir(parents=True)
    gsm = [{"question": f"Tom has {i} apples and buys {i}. How many now?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"}
           for i in range(1, 6)]
    (root / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm))
    sqa = [{"qid": f"s{i}", "question": q, "answer": a, "facts": ["A fact."]}
           for i, (q, a) in enumerate([("Can fish fly?", False), ("Is ice cold?", True), ("Do owls sleep?", True)])]
    (root / "strategyqa" / "dev.json").write_text(json.dumps(sqa))
    arc = [{"id": f"arc-{i}", "answerKey": key, "question": {"stem": f"Question {i}?", "choices": [
        {"label": lab, "text": text} for lab, text in zip(labels, ("light", "water", "soil", "air"))]}}
        for i, (key, labels) in enumerate([("B", "ABCD"), ("3", "1234"), ("A", "ABCD")])]
    (root / "arc_challenge" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc))
    (root / "wikitext2_raw" / "wiki.test.raw").write_text(" \n = Robert Boulter = \n \n Robert is an actor . \n" * 3)
    return root


GSM = [Example("gsm8k", f"g{i}", f"What is {i} + {i}?", str(2 * i)) for i in range(3)]


def test_cot_run_is_saved_reused_and_keyed_by_the_weights(tmp_path):
    lm = tiny_random_model("llama", seed=0)
    first = cot_accuracy(lm, "gsm8k", EvalSettings(max_new_tokens=6), examples=GSM, out_dir=tmp_path, progress=False)
    folder = Path(first.path)
    records = read_records(first)
    assert not first.cached and folder.parent == tmp_path and folder.name.startswith("gsm8k-cot-")
    assert [r["uid"] for r in records] == ["g0", "g1", "g2"] and (folder / "summary.json").is_file()
    assert set(records[0]) >= {"prompt", "generation", "strict", "flexible", "gold", "strict_correct", "steps",
                               "complete", "generated_tokens", "truncated"}
    assert 0 <= first.flexible_accuracy <= 1 and first.chain_stats["n"] == 3 and first.sparsity == 0.0
    again = cot_accuracy(lm, "gsm8k", EvalSettings(max_new_tokens=6), examples=GSM, out_dir=tmp_path, progress=False)
    assert again.cached and replace(again, cached=False) == first
    forced = cot_accuracy(lm, "gsm8k", EvalSettings(max_new_tokens=6), examples=GSM, out_dir=tmp_path, force=True,
                          progress=False)
    assert not forced.cached and forced.path == first.path and forced.value == first.value
    longer = cot_accuracy(lm, "gsm8k", EvalSettings(max_new_tokens=7), examples=GSM, out_dir=tmp_path, progress=False)
    assert longer.path != first.path
    with torch.no_grad():  # prune in place: the same LoadedModel must not reuse the dense run
        lm.model.model.layers[0].mlp.up_proj.weight[:, :4] = 0
    pruned = cot_accuracy(lm, "gsm8k", EvalSettings(max_new_tokens=6), examples=GSM, out_dir=tmp_path, progress=False)
    assert not pruned.cached and pruned.path != first.path and pruned.sparsity > 0
    assert pruned.model["fingerprint"] != first.model["fingerprint"]


def _cot(lm, out_dir, **kw):
    return cot_accuracy(lm, "gsm8k", EvalSettings(max_new_tokens=3), examples=GSM[:2], out_dir=out_dir, progress=False,
                        **kw)


@pytest.mark.parametrize("damage", ["emptied records", "truncated records", "edited summary", "unparsable summary",
                                    "missing records"])
def test_a_damaged_saved_run_is_reported_in_one_line_and_recomputed(tmp_path, damage):
    lm = tiny_random_model("llama", seed=0)
    first = _cot(lm, tmp_path)
    folder = Path(first.path)
    records, summary = folder / "records.jsonl", folder / "summary.json"
    good_records = read_records(first)
    if damage == "emptied records":
        records.write_text("")
    elif damage == "truncated records":  # still valid JSON lines: one example fewer
        records.write_text(records.read_text().splitlines(keepends=True)[0])
    elif damage == "edited summary":  # still valid JSON: a different n
        summary.write_text(summary.read_text().replace('"n": 2', '"n": 9'))
    elif damage == "unparsable summary":
        summary.write_text("{not json")
    else:
        records.unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = _cot(lm, tmp_path)
    ours = [str(w.message) for w in caught if str(w.message).startswith("cap_lab:")]
    assert len(ours) == 1 and "\n" not in ours[0] and str(folder) in ours[0], ours
    assert not second.cached and second.path == first.path and second.n == 2
    assert read_records(second) == good_records and json.loads(summary.read_text())["result"]["n"] == 2
    assert _cot(lm, tmp_path).cached  # the recomputed run is whole again


def test_seeded_subsets():
    pool = [Example("gsm8k", str(i), "q", "1") for i in range(50)]
    a, b = select_examples(pool, 10, seed=3), select_examples(pool, 10, seed=3)
    assert a == b and len(a) == 10 and [int(e.uid) for e in a] == sorted(int(e.uid) for e in a)
    assert select_examples(pool, 10, seed=4) != a and select_examples(pool, None) == pool
    assert select_examples(pool, 500) == pool
    with pytest.raises(ValueError, match="limit"):
        select_examples(pool, 0)


def test_evaluate_every_task_on_a_data_dir(tmp_path, data_dir):
    lm = tiny_random_model("qwen2", seed=1)
    results = evaluate(lm, EVAL_TASKS, EvalSettings(limit=2, max_new_tokens=4, ppl_seqlen=16, ppl_windows=2),
                       data_dir=data_dir, out_dir=tmp_path / "runs", progress=False)
    assert list(results) == ["gsm8k", "strategyqa", "arc_challenge", "wikitext2"]
    assert all(r.n == 2 for r in results.values())
    assert results["wikitext2"].details["n_tokens"] == 32
    assert {r.model["fingerprint"] for r in results.values()} == {results["gsm8k"].model["fingerprint"]}
    loglik = evaluate(lm, "arc_challenge,strategyqa", EvalSettings(mode="loglik"), data_dir=data_dir,
                      out_dir=tmp_path / "runs", progress=False)
    assert loglik["arc_challenge"].n == 3 and loglik["strategyqa"].metric == "loglik_accuracy"
    table = results_table({**results, "arc_loglik": loglik["arc_challenge"]})
    assert len(table) == 5 and table["value"].notna().all()


def test_parse_tasks():
    assert parse_tasks("gsm8k, wikitext2") == ("gsm8k", "wikitext2")
    with pytest.raises(ValueError, match="'mmlu'"):
        parse_tasks("gsm8k,mmlu")
    with pytest.raises(ValueError, match="mode='loglik'"):
        parse_tasks(["gsm8k"], mode="loglik")
    with pytest.raises(ValueError, match="mode="):
        parse_tasks("gsm8k", mode="sample")


def test_cli_evaluates_a_pruned_checkpoint(tmp_path, data_dir, capsys):
    lm = tiny_random_model("llama", seed=2)
    with torch.no_grad():
        for layer in lm.model.model.layers:
            layer.mlp.down_proj.weight[:, ::2] = 0
    folder = save_pruned(lm.model, lm.tokenizer, tmp_path / "pruned", {"method": "magnitude", "achieved_sparsity": 0.1})
    argv = ["eval", "--model", str(folder), "--tasks", "gsm8k,wikitext2", "--limit", "2", "--max-new-tokens", "3",
            "--ppl-seqlen", "16", "--ppl-windows", "2", "--out", str(tmp_path / "runs"), "--data-dir", str(data_dir),
            "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "strict_accuracy" in out and "perplexity" in out and "sparsity" in out
    summaries = sorted((tmp_path / "runs").glob("*/summary.json"))
    assert len(summaries) == 2
    result = json.loads(summaries[0].read_text())["result"]
    assert result["sparsity"] > 0 and result["model"]["name"] == str(folder)
    assert main(argv) == 0 and "True" in capsys.readouterr().out  # second run: read back (cached)


def test_cli_reports_user_errors_in_one_line(capsys):
    assert main(["eval", "--tasks", "gsm8k,mmlu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cap-lab: error:") and "mmlu" in err and err.count("\n") == 1
    assert main(["eval", "--tasks", "gsm8k", "--mode", "loglik"]) == 2
    assert main(["eval", "--ppl-windows", "0"]) == 2
