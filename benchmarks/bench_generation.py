"""Greedy generation throughput: batch 1 against the batched path, on the default model.

Both paths run :func:`cap_lab.evaluation.generate_greedy` on GSM8K chain-of-thought prompts
(the real evaluation prompts, from ``$CAP_LAB_DATA``; built-in questions without it) and count
generated tokens (stop tokens excluded) per second of wall time, prefill included. Batch 1 is
slow, so it runs on a seeded subset of the same prompts (``--batch1-prompts``), half before and
half after the batched run so that a change in machine load hits both paths alike. The last
line is machine-readable::

    batch1_tok_s=<a> batched_tok_s=<b> ratio=<b/a>

Usage: ``python benchmarks/bench_generation.py [--batch-size 32] [--max-new-tokens 256] [--threads 1]``
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

from cap_lab.data import Example
from cap_lab.evaluation import generate_greedy, stop_token_ids
from cap_lab.evaluation.subsets import evaluation_examples
from cap_lab.models import DEFAULT_MODEL, load_model
from cap_lab.prompts import cot_user_text, encode_prompt

FALLBACK_QUESTIONS = [
    "A baker makes {n} loaves a day and sells each for $3. How much does she earn in a week?",
    "Tom has {n} marbles. He gives a third of them to Ann and loses 2. How many are left?",
    "A train travels {n} miles in 2 hours. How far does it go in 5 hours at the same speed?",
    "Sara reads {n} pages on Monday and twice as many on Tuesday. How many pages did she read?",
]


def benchmark_prompts(tokenizer, n: int, seed: int) -> list[list[int]]:
    if os.environ.get("CAP_LAB_DATA"):
        examples = evaluation_examples("gsm8k", limit=n, seed=seed)
    else:
        examples = [Example("gsm8k", str(i), FALLBACK_QUESTIONS[i % 4].format(n=12 + 3 * i), "0") for i in range(n)]
    return [encode_prompt(tokenizer, cot_user_text(e)) for e in examples]


def timed(model, prompts, batch_size, **kw) -> tuple[list, float]:
    start = time.perf_counter()
    generations = generate_greedy(model, prompts, batch_size=batch_size, **kw)
    return generations, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--n-prompts", type=int, default=32, help="prompts of the batched run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batch1-prompts", type=int, default=4, help="seeded subset run at batch 1")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, device="cpu" if not torch.cuda.is_available() else None)
    prompts = benchmark_prompts(lm.tokenizer, args.n_prompts, args.seed)
    subset = sorted(random.Random(args.seed).sample(range(len(prompts)), min(args.batch1_prompts, len(prompts))))
    kw = dict(max_new_tokens=args.max_new_tokens, stop_ids=stop_token_ids(lm.tokenizer, lm.model),
              pad_id=lm.tokenizer.pad_token_id)
    print(f"model {lm.name}, {torch.get_num_threads()} threads, device {next(lm.model.parameters()).device}, "
          f"max_new_tokens {args.max_new_tokens}; prompt tokens: batched run mean "
          f"{statistics.fmean(map(len, prompts)):.0f}, batch-1 subset mean {statistics.fmean(len(prompts[i]) for i in subset):.0f}")
    generate_greedy(lm.model, prompts[:2], batch_size=2, **dict(kw, max_new_tokens=4))  # warm-up

    half = len(subset) // 2
    first, t_first = timed(lm.model, [prompts[i] for i in subset[:half]], 1, **kw)
    batched, t_batched = timed(lm.model, prompts, args.batch_size, **kw)
    second, t_second = timed(lm.model, [prompts[i] for i in subset[half:]], 1, **kw)
    single = first + second
    n_single = sum(len(g.tokens) for g in single)
    n_batched = sum(len(g.tokens) for g in batched)
    batch1_tok_s = n_single / (t_first + t_second)
    batched_tok_s = n_batched / t_batched
    same = sum(batched[i].tokens == g.tokens for i, g in zip(subset, single))
    print(f"batch 1:  {len(single)} prompts, {n_single} tokens in {t_first + t_second:.1f} s")
    print(f"batch {args.batch_size}: {len(prompts)} prompts, {n_batched} tokens in {t_batched:.1f} s")
    print(f"batched == batch-1 tokens for {same}/{len(single)} prompts of the subset")
    print(f"batch1_tok_s={batch1_tok_s:.2f} batched_tok_s={batched_tok_s:.2f} ratio={batched_tok_s / batch1_tok_s:.2f}")


if __name__ == "__main__":
    main()
