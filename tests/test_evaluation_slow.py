"""The real default model on the real data dir: every task end to end, small limits (about a minute of CPU).

Needs ``CAP_LAB_DATA`` (skipped without it) and the default model's weights package.
"""
import json
import math
import os
from pathlib import Path

import pytest

from cap_lab.data import load_task
from cap_lab.evaluation import EvalSettings, evaluate, generate_greedy, read_records, stop_token_ids
from cap_lab.prompts import cot_user_text, encode_prompt

pytestmark = pytest.mark.slow
LIMIT = 8


@pytest.fixture(scope="module")
def lm():
    if not os.environ.get("CAP_LAB_DATA"):
        pytest.skip("CAP_LAB_DATA is not set")
    from cap_lab.models import load_model

    try:
        return load_model(device="cpu")
    except ImportError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def test_cot_on_every_reasoning_task(lm, out_dir):
    # a short cap keeps CI fast; the full defaults (512 GSM8K / 256) are for real runs
    results = evaluate(lm, "gsm8k,strategyqa,arc_challenge", EvalSettings(limit=LIMIT, max_new_tokens=24, batch_size=LIMIT),
                       out_dir=out_dir, progress=False)
    for task, r in results.items():
        assert r.n == LIMIT and 0 <= r.strict_accuracy <= r.value + 1e-12 <= 1 and 0 <= r.flexible_accuracy <= 1
        records = read_records(r)
        assert len(records) == LIMIT and all(rec["generation"] for rec in records), task
        assert r.chain_stats["n"] == LIMIT and r.chain_stats["max_generated_tokens"] <= 24
        summary = json.loads((Path(r.path) / "summary.json").read_text())
        assert summary["result"]["settings"]["stop_ids"] == [2]  # <|im_end|>
        assert "<|im_start|>assistant" in records[0]["prompt"]


def test_loglik_accuracy(lm, out_dir):
    results = evaluate(lm, "arc_challenge,strategyqa", EvalSettings(mode="loglik", limit=LIMIT), out_dir=out_dir,
                       progress=False)
    for r in results.values():
        assert r.n == LIMIT and 0 <= r.value <= 1 and 0 <= r.details["loglik_accuracy_norm"] <= 1
        assert all(math.isfinite(o["logprob"]) and o["logprob"] < 0 for rec in read_records(r) for o in rec["options"])


def test_wikitext2_perplexity(lm, out_dir):
    r = evaluate(lm, ["wikitext2"], EvalSettings(ppl_seqlen=512, ppl_windows=2), out_dir=out_dir,
                 progress=False)["wikitext2"]
    assert r.details["seqlen"] == 512 and r.details["n_tokens"] == 1024 and r.n == 2
    assert math.isfinite(r.value) and 1 < r.value < 200 and r.ci_low < r.value < r.ci_high
    assert len(read_records(r)) == 2


def test_batched_generation_equals_unbatched_on_the_real_model(lm):
    examples = load_task("gsm8k", "test")[:2]
    prompts = [encode_prompt(lm.tokenizer, cot_user_text(e)) for e in examples]
    kw = dict(max_new_tokens=8, stop_ids=stop_token_ids(lm.tokenizer, lm.model), pad_id=lm.tokenizer.pad_token_id)
    single = [generate_greedy(lm.model, [p], **kw)[0].tokens for p in prompts]
    assert [g.tokens for g in generate_greedy(lm.model, prompts, batch_size=2, **kw)] == single
