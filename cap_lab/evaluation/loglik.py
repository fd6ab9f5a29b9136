"""Log-likelihood multiple-choice accuracy for ARC-Challenge and StrategyQA.

Generated chain-of-thought answers of small models are close to chance and noisy; scoring
the options directly is a low-variance complement (the ``acc``/``acc_norm`` of the LM
Evaluation Harness). For each question the prompt is rendered like the CoT prompts (chat
template when the model has one) from :data:`LOGLIK_INSTRUCTIONS`, without asking for
reasoning, and every option is scored as a continuation of it:

* ARC-Challenge: the option's text (``"Plants need sunlight"``); the options are not listed
  in the prompt, so the model judges the answer itself, not a letter;
* StrategyQA: ``"Yes"`` and ``"No"``.

``loglik_accuracy`` picks the option with the highest summed log-probability;
``loglik_accuracy_norm`` divides each sum by the option's length in characters (the harness's
``acc_norm``), which removes the bias toward short options. Gold is ``answerKey`` (ARC) and
the boolean answer (StrategyQA).

Cost: :func:`option_logprobs` runs each prompt once and the options on its KV cache;
:func:`continuation_logprobs` is the obvious version (prompt + option as one sequence, one
sequence per option) that the fast one is tested against.
"""
from __future__ import annotations

import hashlib
import json
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from cap_lab.data import EVALUATION_SPLIT, Example
from cap_lab.evaluation.generation import prefill_inputs, shared_prefix
from cap_lab.modeling import decoder_forward, get_layout, model_device, select_cache, token_logprobs
from cap_lab.evaluation.results import EVAL_VERSION, EvalResult, cached_run, describe_model, wilson_interval
from cap_lab.evaluation.settings import EvalSettings
from cap_lab.evaluation.subsets import evaluation_examples, examples_digest
from cap_lab.prompts import encode_continuation, encode_prompt, resolve_style

LOGLIK_TASKS = ("strategyqa", "arc_challenge")
LOGLIK_INSTRUCTIONS = {
    "strategyqa": "Answer the following yes/no question with yes or no.",
    "arc_challenge": "Answer the following science question.",
}
LOGLIK_VERSION = "1"  # bump when LOGLIK_INSTRUCTIONS or the option texts change


def loglik_user_text(example: Example) -> str:
    """The user message of a log-likelihood prompt (no options listed, no reasoning asked)."""
    return f"{LOGLIK_INSTRUCTIONS[example.task]}\n\nQuestion: {example.question}"


def loglik_options(example: Example) -> list[tuple[str, str]]:
    """``(label, continuation text)`` of every option."""
    if example.task == "strategyqa":
        return [("yes", "Yes"), ("no", "No")]
    if example.task == "arc_challenge":
        return list(example.choices)
    raise ValueError(f"log-likelihood scoring supports {', '.join(LOGLIK_TASKS)}, not {example.task!r}")


@torch.inference_mode()
def continuation_logprobs(model: nn.Module, contexts: list[list[int]], continuations: list[list[int]], *,
                          pad_id: int = 0, batch_size: int = 32, progress: bool = False) -> list[float]:
    """Summed log p(continuation | context) of each pair, batched with right padding.

    Only the hidden states that predict continuation tokens go through the LM head.

    Args:
        model: a causal LM.
        contexts: token ids of each context (at least one token).
        continuations: token ids of each continuation (at least one token).
        pad_id: padding id (masked out).
        batch_size: sequences per forward.
        progress: progress bar.

    Returns:
        One summed log-probability per pair.
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    if any(not c for c in contexts) or any(not c for c in continuations):
        raise ValueError("every context and continuation needs at least one token")
    device, layout = model_device(model), get_layout(model)
    order = sorted(range(len(contexts)), key=lambda i: -(len(contexts[i]) + len(continuations[i])))
    out = [0.0] * len(contexts)
    for lo in tqdm(range(0, len(order), batch_size), desc="loglik", unit="batch", disable=not progress, dynamic_ncols=True):
        chunk = order[lo: lo + batch_size]
        seqs = [contexts[i] + continuations[i] for i in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        rows, positions, targets = [], [], []
        for r, (i, seq) in enumerate(zip(chunk, seqs)):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            start = len(contexts[i])  # first continuation token; predicted from position start - 1
            rows += [r] * len(continuations[i])
            positions += list(range(start - 1, len(seq) - 1))
            targets += continuations[i]
        hidden, _ = decoder_forward(model, layout, ids.to(device), attention_mask=mask.to(device))  # (b, T, d)
        picked = hidden[torch.tensor(rows, device=device), torch.tensor(positions, device=device)]  # (K, d)
        logp = token_logprobs(model, layout, picked, torch.tensor(targets, device=device)).cpu()  # (K,)
        sums = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, torch.tensor(rows), logp.double())
        for r, i in enumerate(chunk):
            out[i] = float(sums[r])
    return out


@torch.inference_mode()
def option_logprobs(model: nn.Module, contexts: list[list[int]], options: list[list[list[int]]], *, pad_id: int = 0,
                    batch_size: int = 32, share_prefix: bool = True, progress: bool = False) -> list[list[float]]:
    """Summed log p(option | context) of every option of every question, each context run once.

    The contexts' common prefix (system prompt, instruction) runs once per call; the rest of
    each context of a batch of questions is left-padded after it and run once with the KV
    cache (:func:`cap_lab.evaluation.generation.prefill_inputs`). The cache is then repeated
    once per option (``batch_select_indices``) and all options run on top of it, right-padded. The last context position predicts each option's first token.
    Equals :func:`continuation_logprobs` on the concatenations (the tests check it), at about
    ``1 / n_options`` of its cost.

    Args:
        model: a causal LM.
        contexts: token ids of each question's prompt (at least one token).
        options: for each question, the token ids of each option (at least one token each).
        pad_id: padding id (masked out).
        batch_size: questions per forward.
        share_prefix: run the contexts' common prefix once.
        progress: progress bar in questions.

    Returns:
        For each question, one summed log-probability per option.
    """
    if len(contexts) != len(options):
        raise ValueError(f"{len(contexts)} contexts but {len(options)} option lists")
    if any(not c for c in contexts) or any(not opts or any(not o for o in opts) for opts in options):
        raise ValueError("every context, option list and option needs at least one token")
    device, layout = model_device(model), get_layout(model)
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
    out: list[list[float]] = [[] for _ in contexts]
    longest = 2 * max(map(len, contexts)) + max(len(o) for opts in options for o in opts)
    prefix_cache, prefix_len = shared_prefix(model, contexts, longest, share_prefix)
    with tqdm(total=len(contexts), desc="loglik", unit="ex", disable=not progress, dynamic_ncols=True) as bar:
        for lo in range(0, len(order), batch_size):
            chunk = order[lo: lo + batch_size]
            ids, mask, positions, cache = prefill_inputs([contexts[i] for i in chunk], pad_id, device, prefix_cache,
                                                         prefix_len)  # ids (b, T), mask (b, P + T)
            ctx, cache = decoder_forward(model, layout, ids, attention_mask=mask, position_ids=positions, cache=cache,
                                         use_cache=True)  # (b, T, d)
            last = ctx[:, -1]  # (b, d): predicts every option's first token
            rows = [r for r, i in enumerate(chunk) for _ in options[i]]  # option -> context row
            opts = [o for i in chunk for o in options[i]]
            index = torch.tensor(rows, device=device)
            select_cache(cache, index)  # (n_opts, ...) rows repeated per option
            width = max(len(o) for o in opts)
            opt_ids = torch.full((len(opts), width), pad_id, dtype=torch.long)
            opt_mask = torch.zeros((len(opts), width), dtype=torch.long)
            for k, o in enumerate(opts):
                opt_ids[k, : len(o)] = torch.tensor(o)
                opt_mask[k, : len(o)] = 1
            opt_positions = positions[index, -1:] + 1 + torch.arange(width, device=device)  # (n_opts, W)
            hidden, _ = decoder_forward(model, layout, opt_ids.to(device), position_ids=opt_positions, cache=cache,
                                        attention_mask=torch.cat([mask[index], opt_mask.to(device)], 1))
            predictors = torch.cat([torch.cat([last[r: r + 1], hidden[k, : len(o) - 1]]) for k, (r, o) in
                                    enumerate(zip(rows, opts))])  # (sum len, d)
            logp = token_logprobs(model, layout, predictors, torch.tensor([t for o in opts for t in o], device=device)).cpu()
            sums = torch.split(logp.double(), [len(o) for o in opts])
            k = 0
            for i in chunk:
                out[i] = [float(sums[k + j].sum()) for j in range(len(options[i]))]
                k += len(options[i])
            bar.update(len(chunk))
    return out


def loglik_accuracy(lm, task: str, settings: EvalSettings = EvalSettings(mode="loglik"), *,
                    examples: list[Example] | None = None, data_dir=None, out_dir=None, force: bool = False,
                    progress: bool = True, model_info: dict | None = None) -> EvalResult:
    """Log-likelihood multiple-choice accuracy on ARC-Challenge or StrategyQA (module docstring).

    Arguments as in :func:`cap_lab.evaluation.cot.cot_accuracy`; of the settings, ``limit``,
    ``seed``, ``prompt_style`` and ``batch_size`` apply.

    Returns:
        :class:`EvalResult` with ``metric="loglik_accuracy"``; ``details`` holds the
        length-normalized accuracy ``loglik_accuracy_norm`` and its interval.
    """
    if task not in LOGLIK_TASKS:
        raise ValueError(f"log-likelihood accuracy supports {', '.join(LOGLIK_TASKS)}; got {task!r}")
    limit, seed, batch_size = settings.limit, settings.seed, settings.batch_size
    examples = evaluation_examples(task, limit, seed, data_dir) if examples is None else list(examples)
    if not examples:
        raise ValueError(f"no {task} examples to evaluate")
    style = resolve_style(lm.tokenizer, settings.prompt_style)
    info = model_info or describe_model(lm)
    tok = lm.tokenizer
    contexts = [encode_prompt(tok, loglik_user_text(e), style) for e in examples]
    choices = [loglik_options(e) for e in examples]  # (label, text) per option
    option_ids = [[encode_continuation(tok, text, style) for _, text in c] for c in choices]
    payload = {
        "eval_version": EVAL_VERSION, "loglik_version": LOGLIK_VERSION, "task": task, "mode": "loglik",
        "model": info["identity"], "dtype": info["dtype"], "device_type": info["device_type"],
        "split": EVALUATION_SPLIT[task], "limit": limit, "seed": seed, "n": len(examples),
        "examples_sha256": examples_digest(examples), "prompt_style": style,
        "inputs_sha256": hashlib.sha256(json.dumps([contexts, option_ids]).encode()).hexdigest()[:16],
    }

    def compute() -> tuple[EvalResult, list[dict]]:
        start = time.perf_counter()
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        scores = option_logprobs(lm.model, contexts, option_ids, pad_id=pad_id, batch_size=batch_size,
                                 progress=progress)
        records = []
        for e, c, ids, logps in zip(examples, choices, option_ids, scores):
            options = [{"label": label, "text": text, "logprob": lp, "tokens": len(t), "chars": len(text)}
                       for (label, text), t, lp in zip(c, ids, logps)]
            best = max(options, key=lambda o: o["logprob"])  # ties: first option
            best_norm = max(options, key=lambda o: o["logprob"] / max(o["chars"], 1))
            records.append({"uid": e.uid, "gold": e.gold, "options": options, "pred": best["label"],
                            "pred_norm": best_norm["label"], "correct": best["label"] == e.gold,
                            "correct_norm": best_norm["label"] == e.gold})
        n = len(records)
        n_correct = sum(r["correct"] for r in records)
        n_norm = sum(r["correct_norm"] for r in records)
        ci, ci_norm = wilson_interval(n_correct, n), list(wilson_interval(n_norm, n))
        details = {"correct": n_correct, "loglik_accuracy_norm": n_norm / n, "loglik_accuracy_norm_ci": ci_norm,
                   "correct_norm": n_norm, "n_options": sum(len(c) for c in choices), "seconds": time.perf_counter() - start,
                   "batch_size": batch_size}
        result = EvalResult(task=task, mode="loglik", metric="loglik_accuracy", value=n_correct / n, ci_low=ci[0],
                            ci_high=ci[1], n=n, settings=payload, model=info["identity"], sparsity=info["sparsity"],
                            details=details)
        return result, records

    return cached_run(payload, out_dir, force, compute)
