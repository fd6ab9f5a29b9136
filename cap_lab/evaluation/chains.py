"""Reasoning-chain statistics of chain-of-thought generations (paper Sec. 6.1, future work).

Final-answer accuracy hides *how* a pruned model fails. For every generation we record

* ``steps``: the number of non-empty lines before the last ``Answer:`` line (every non-empty
  line when there is none), a cheap proxy for the number of reasoning steps;
* ``complete``: whether an ``Answer:`` line is present at all (chain completeness);
* ``generated_tokens``: the generated length in tokens (the stop token not counted);
* ``truncated``: whether generation hit ``max_new_tokens`` instead of stopping by itself.

:func:`summarize_chains` turns a run's records into means and rates, so a pruned model's
truncated or rambling chains show next to its accuracy.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from cap_lab.evaluation.extraction import ANSWER_LINE


@dataclass(frozen=True)
class ChainStats:
    """Shape of one generated reasoning chain (see the module docstring)."""

    steps: int
    complete: bool
    generated_tokens: int
    truncated: bool

    def to_dict(self) -> dict:
        return asdict(self)


def chain_stats(text: str, generated_tokens: int, truncated: bool) -> ChainStats:
    """Statistics of one generation.

    Args:
        text: the decoded generation.
        generated_tokens: its length in tokens.
        truncated: whether it was cut by ``max_new_tokens``.

    >>> chain_stats("16 - 3 = 13\\n\\n13 * 2 = 26\\nAnswer: 26", 20, False).steps
    2
    """
    answers = list(ANSWER_LINE.finditer(text))
    body = text[: answers[-1].start()] if answers else text
    steps = sum(1 for line in body.splitlines() if line.strip())
    return ChainStats(steps=steps, complete=bool(answers), generated_tokens=generated_tokens, truncated=truncated)


def summarize_chains(stats: list[ChainStats]) -> dict:
    """Per-run summary: mean and median steps and length, completeness and truncation rates."""
    if not stats:
        return {"n": 0}
    steps = [s.steps for s in stats]
    lengths = [s.generated_tokens for s in stats]
    return {
        "n": len(stats),
        "mean_steps": statistics.fmean(steps),
        "median_steps": statistics.median(steps),
        "complete_rate": sum(s.complete for s in stats) / len(stats),
        "truncated_rate": sum(s.truncated for s in stats) / len(stats),
        "mean_generated_tokens": statistics.fmean(lengths),
        "median_generated_tokens": statistics.median(lengths),
        "max_generated_tokens": max(lengths),
    }
