"""Chain-of-thought generation accuracy (paper Sec. 4, Table 1; prompts App. B).

For each example: render the CoT prompt (:func:`cap_lab.prompts.cot_user_text`, through the
model's chat template when it has one), decode greedily (:mod:`cap_lab.evaluation.generation`)
up to ``max_new_tokens`` (512 for GSM8K, whose chains a 256 cut-off truncates; 256 otherwise),
then extract the answer strictly and flexibly (:mod:`cap_lab.evaluation.extraction`) and
compare with the gold answer. The paper's metric is strict accuracy; flexible accuracy and the
reasoning-chain statistics (:mod:`cap_lab.evaluation.chains`) are reported beside it.
"""
from __future__ import annotations

import hashlib
import json
import time

from cap_lab.data import EVALUATION_SPLIT, TASKS, Example
from cap_lab.evaluation.chains import chain_stats, summarize_chains
from cap_lab.evaluation.extraction import answers_match, extract_flexible, extract_strict
from cap_lab.evaluation.generation import generate_greedy, stop_token_ids
from cap_lab.evaluation.results import EVAL_VERSION, EvalResult, cached_run, describe_model, wilson_interval
from cap_lab.evaluation.settings import EvalSettings
from cap_lab.evaluation.subsets import evaluation_examples, examples_digest
from cap_lab.prompts import FORMAT_VERSION, cot_user_text, encode_prompt, render_prompt, resolve_style

DEFAULT_MAX_NEW_TOKENS = {"gsm8k": 512, "strategyqa": 256, "arc_challenge": 256}


def score_generation(example: Example, text: str) -> dict:
    """Strict and flexible answers of one generation and whether each is correct."""
    labels = tuple(label for label, _ in example.choices)
    strict = extract_strict(example.task, text, labels)
    flexible = extract_flexible(example.task, text, labels)
    return {"strict": strict, "flexible": flexible,
            "strict_correct": answers_match(example.task, strict, example.gold),
            "flexible_correct": answers_match(example.task, flexible, example.gold)}


def cot_accuracy(lm, task: str, settings: EvalSettings = EvalSettings(), *, examples: list[Example] | None = None,
                 data_dir=None, out_dir=None, force: bool = False, progress: bool = True,
                 model_info: dict | None = None) -> EvalResult:
    """Greedy chain-of-thought accuracy of a model on one reasoning task.

    Args:
        lm: a :class:`cap_lab.models.LoadedModel`.
        task: ``gsm8k``, ``strategyqa`` or ``arc_challenge``.
        settings: ``limit``, ``seed``, ``max_new_tokens`` (default
            :data:`DEFAULT_MAX_NEW_TOKENS`), ``prompt_style`` and ``batch_size`` apply.
        examples: evaluate these instead of the task's evaluation split (``limit`` ignored).
        data_dir: data folder (default ``$CAP_LAB_DATA``, else the hub).
        out_dir: folder for the saved run (default: the cap_lab cache).
        force: recompute even if a run with the same settings is saved.
        progress: progress bar with examples/s.
        model_info: :func:`cap_lab.evaluation.results.describe_model` output, if known.

    Returns:
        :class:`EvalResult` with ``metric="strict_accuracy"``, both accuracies, their Wilson
        intervals in ``details`` and the chain statistics.
    """
    if task not in TASKS:
        raise ValueError(f"unknown CoT task {task!r}; allowed: {', '.join(TASKS)}")
    limit, seed = settings.limit, settings.seed
    examples = evaluation_examples(task, limit, seed, data_dir) if examples is None else list(examples)
    if not examples:
        raise ValueError(f"no {task} examples to evaluate")
    if any(e.task != task for e in examples):
        raise ValueError(f"examples of other tasks passed to the {task} evaluation")
    max_new = settings.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task]
    style = resolve_style(lm.tokenizer, settings.prompt_style)
    info = model_info or describe_model(lm)
    prompts = [encode_prompt(lm.tokenizer, cot_user_text(e), style) for e in examples]
    stop_ids = stop_token_ids(lm.tokenizer, lm.model)
    payload = {
        "eval_version": EVAL_VERSION, "task": task, "mode": "cot", "model": info["identity"], "dtype": info["dtype"],
        "device_type": info["device_type"], "split": EVALUATION_SPLIT[task], "limit": limit, "seed": seed,
        "n": len(examples), "examples_sha256": examples_digest(examples), "prompt_style": style,
        "format_version": FORMAT_VERSION, "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16],
        "max_new_tokens": max_new, "stop_ids": list(stop_ids), "decoding": "greedy",
    }

    def compute() -> tuple[EvalResult, list[dict]]:
        start = time.perf_counter()
        pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else stop_ids[0]
        generations = generate_greedy(lm.model, prompts, max_new_tokens=max_new, stop_ids=stop_ids, pad_id=pad_id,
                                      batch_size=settings.batch_size, progress=progress, desc=f"{task} cot")
        seconds = time.perf_counter() - start
        records, chains = [], []
        for example, ids, gen in zip(examples, prompts, generations):
            text = lm.tokenizer.decode(gen.tokens, skip_special_tokens=True)
            stats = chain_stats(text, len(gen.tokens), gen.truncated)
            chains.append(stats)
            records.append({"uid": example.uid, "prompt": render_prompt(lm.tokenizer, cot_user_text(example), style),
                            "generation": text, "gold": example.gold, **score_generation(example, text),
                            "prompt_tokens": len(ids), "stopped": gen.stopped, **stats.to_dict()})
        n = len(records)
        n_strict = sum(r["strict_correct"] for r in records)
        n_flexible = sum(r["flexible_correct"] for r in records)
        strict_ci, flexible_ci = list(wilson_interval(n_strict, n)), list(wilson_interval(n_flexible, n))
        n_generated = sum(len(g.tokens) for g in generations)
        details = {"strict_correct": n_strict, "flexible_correct": n_flexible, "strict_ci": strict_ci,
                   "flexible_ci": flexible_ci, "seconds": seconds, "generated_tokens": n_generated,
                   "tokens_per_second": n_generated / seconds if seconds > 0 else None, "batch_size": settings.batch_size}
        result = EvalResult(task=task, mode="cot", metric="strict_accuracy", value=n_strict / n, ci_low=strict_ci[0],
                            ci_high=strict_ci[1], n=n, settings=payload, model=info["identity"],
                            sparsity=info["sparsity"], strict_accuracy=n_strict / n, flexible_accuracy=n_flexible / n,
                            chain_stats=summarize_chains(chains), details=details)
        return result, records

    return cached_run(payload, out_dir, force, compute)
