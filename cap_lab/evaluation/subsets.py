"""Which examples an evaluation runs on: the evaluation split, or a seeded subset of it.

``limit`` picks ``limit`` examples uniformly at random with ``random.Random(seed)`` and keeps
them in file order, so a quick run with a given seed always sees the same questions, and a
larger limit is not a prefix-biased sample. :func:`examples_digest` fingerprints the exact
examples (ids, text, gold, options) for run keys.
"""
from __future__ import annotations

import hashlib
import json
import random

from cap_lab.data import EVALUATION_SPLIT, Example, load_task


def select_examples(examples: list[Example], limit: int | None = None, seed: int = 0) -> list[Example]:
    """``examples`` itself, or a seeded random subset of ``limit`` of them in their original order."""
    if limit is None or limit >= len(examples):
        return list(examples)
    if limit < 1:
        raise ValueError(f"limit={limit}; must be >= 1 or None")
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def evaluation_examples(task: str, limit: int | None = None, seed: int = 0, data_dir=None) -> list[Example]:
    """The evaluation split of ``task`` (:data:`cap_lab.data.EVALUATION_SPLIT`), subset by ``limit``."""
    if task not in EVALUATION_SPLIT:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(EVALUATION_SPLIT)}")
    return select_examples(load_task(task, EVALUATION_SPLIT[task], data_dir), limit, seed)


def examples_digest(examples: list[Example]) -> str:
    """SHA-256 (16 hex chars) of the examples' uid, question, gold and options."""
    blob = json.dumps([[e.task, e.uid, e.question, e.gold, list(e.choices)] for e in examples])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
