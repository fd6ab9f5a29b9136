"""Benchmark data: GSM8K, StrategyQA, ARC-Challenge and WikiText-2 (raw), from disk or the hub.

Source order (first that applies):

1. an explicit ``data_dir`` argument;
2. the ``CAP_LAB_DATA`` environment variable;
3. the Hugging Face hub through ``datasets`` (needs network access).

A data dir keeps the original file formats under this layout::

    gsm8k/{train,test}.jsonl                  {"question", "answer": "... #### 72"}
    arc_challenge/{train,validation,test}.jsonl  AI2's ARC-V1-Feb2018 JSONL
    strategyqa/{train,dev}.json               the StrategyQA authors' train/dev split
    wikitext2_raw/wiki.test.raw               raw wikitext-2-raw-v1 test file

Splits (paper Sec. 3.1: calibration is disjoint from evaluation): calibration draws from the
train splits only; evaluation uses GSM8K test, ARC-Challenge test and StrategyQA dev.
ARC-Challenge's train and test files share six question stems; :func:`calibration_pool`
drops train examples whose question text appears in the evaluation split, and
:func:`assert_disjoint` checks the result.

Hub fallback: ``openai/gsm8k`` (main), ``allenai/ai2_arc`` (ARC-Challenge),
``wikitext`` (wikitext-2-raw-v1) and ``tasksource/strategy-qa``. The hub's StrategyQA has only
the official train set, so there ``dev`` is a seeded 10% slice of it (and ``train`` the rest):
numbers computed that way are not comparable with the authors' dev split that a data dir holds.
"""
from __future__ import annotations

import json
import os
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

TASKS = ("gsm8k", "strategyqa", "arc_challenge")
CALIBRATION_SPLIT = {"gsm8k": "train", "strategyqa": "train", "arc_challenge": "train"}
EVALUATION_SPLIT = {"gsm8k": "test", "strategyqa": "dev", "arc_challenge": "test"}
_FILES = {
    ("gsm8k", "train"): "gsm8k/train.jsonl",
    ("gsm8k", "test"): "gsm8k/test.jsonl",
    ("arc_challenge", "train"): "arc_challenge/train.jsonl",
    ("arc_challenge", "validation"): "arc_challenge/validation.jsonl",
    ("arc_challenge", "test"): "arc_challenge/test.jsonl",
    ("strategyqa", "train"): "strategyqa/train.json",
    ("strategyqa", "dev"): "strategyqa/dev.json",
    ("wikitext2", "test"): "wikitext2_raw/wiki.test.raw",
}
LAYOUT_HELP = "expected layout under the data dir: " + ", ".join(sorted(set(_FILES.values())))
NO_DATA_SOURCE_HELP = (
    "no data source: set CAP_LAB_DATA or pass --data-dir (data_dir=) to a data folder ("
    + LAYOUT_HELP + "), or install `datasets` (pip install datasets) to download from the Hugging Face hub"
)


def _hub_load_dataset():
    """``datasets.load_dataset``, or an ImportError that says how to give a data dir instead."""
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise ImportError(NO_DATA_SOURCE_HELP) from e
    return load_dataset


@dataclass(frozen=True)
class Example:
    """One benchmark question.

    Attributes:
        task: ``gsm8k``, ``strategyqa`` or ``arc_challenge``.
        uid: unique id within the task and split.
        question: the question text (ARC: the stem, options are in ``choices``).
        gold: the answer: GSM8K a number string, StrategyQA ``yes``/``no``, ARC the option label.
        solution: GSM8K's worked solution without its ``#### n`` line; empty otherwise.
        choices: ARC's ``(label, text)`` options; empty otherwise.
        facts: StrategyQA's gold facts; empty otherwise.
    """

    task: str
    uid: str
    question: str
    gold: str
    solution: str = ""
    choices: tuple[tuple[str, str], ...] = ()
    facts: tuple[str, ...] = ()


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """``data_dir``, else ``$CAP_LAB_DATA``, else ``None`` (meaning: the hub)."""
    chosen = data_dir if data_dir is not None else os.environ.get("CAP_LAB_DATA") or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data dir {str(path)!r} does not exist; {LAYOUT_HELP}")
    return path


def _check_split(task: str, split: str) -> None:
    if (task, split) not in _FILES:
        allowed = sorted({s for t, s in _FILES if t == task})
        if not allowed:
            raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS + ('wikitext2',))}")
        raise ValueError(f"unknown split {split!r} for {task}; allowed: {', '.join(allowed)}")


def _data_file(data_dir: Path, task: str, split: str) -> Path:
    path = data_dir / _FILES[(task, split)]
    if not path.is_file():
        raise FileNotFoundError(f"missing data file {str(path)!r}; {LAYOUT_HELP}")
    return path


# ------------------------------------------------------------------ record parsing
_GSM_ANSWER = re.compile(r"####\s*(.+?)\s*$")


def _gsm8k(records: list[dict], split: str) -> list[Example]:
    out = []
    for i, r in enumerate(records):
        solution, _, final = r["answer"].rpartition("####")
        gold = final.strip().replace(",", "")
        out.append(Example("gsm8k", f"gsm8k-{split}-{i}", r["question"].strip(), gold, solution=solution.strip()))
    return out


def _arc(records: list[dict]) -> list[Example]:
    out = []
    for r in records:
        q = r["question"]
        if isinstance(q, dict):  # AI2 JSONL
            stem, choices = q["stem"], tuple((c["label"], c["text"]) for c in q["choices"])
        else:  # hub: question str, choices {"text": [...], "label": [...]}
            stem, choices = q, tuple(zip(r["choices"]["label"], r["choices"]["text"]))
        assert r["answerKey"] in {lab for lab, _ in choices}, r["id"]
        out.append(Example("arc_challenge", r["id"], stem.strip(), r["answerKey"], choices=choices))
    return out


def _strategyqa(records: list[dict]) -> list[Example]:
    return [
        Example("strategyqa", r["qid"], r["question"].strip(), "yes" if r["answer"] else "no",
                facts=tuple(f.strip() for f in r.get("facts", ())))
        for r in records
    ]


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _from_disk(data_dir: Path, task: str, split: str) -> list[Example]:
    path = _data_file(data_dir, task, split)
    if task == "gsm8k":
        return _gsm8k(_read_jsonl(path), split)
    if task == "arc_challenge":
        return _arc(_read_jsonl(path))
    return _strategyqa(json.loads(path.read_text(encoding="utf-8")))


def _from_hub(task: str, split: str) -> list[Example]:  # pragma: no cover - needs network
    load_dataset = _hub_load_dataset()

    if task == "gsm8k":
        return _gsm8k(list(load_dataset("openai/gsm8k", "main", split=split)), split)
    if task == "arc_challenge":
        return _arc(list(load_dataset("allenai/ai2_arc", "ARC-Challenge", split=split)))
    records = list(load_dataset("tasksource/strategy-qa", split="train"))
    random.Random(0).shuffle(records)
    cut = len(records) // 10
    return _strategyqa(records[:cut] if split == "dev" else records[cut:])


def load_task(task: str, split: str, data_dir: str | os.PathLike | None = None) -> list[Example]:
    """Load one split of a reasoning benchmark as :class:`Example` records (file order).

    Args:
        task: ``gsm8k``, ``strategyqa`` or ``arc_challenge``.
        split: GSM8K ``train``/``test``; ARC ``train``/``validation``/``test``; StrategyQA
            ``train``/``dev``.
        data_dir: see the module docstring for the source order.

    Raises:
        ValueError: unknown task or split. FileNotFoundError: a missing file (names the path).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    _check_split(task, split)
    root = resolve_data_dir(data_dir)
    return _from_disk(root, task, split) if root is not None else _from_hub(task, split)


def load_wikitext2_test(data_dir: str | os.PathLike | None = None) -> str:
    """The WikiText-2 raw test split as one string, joined the way Wanda/SparseGPT do.

    Those scripts tokenize ``"\\n\\n".join(dataset["text"])`` of the hub dataset, whose rows
    are the file's lines with blank lines turned into ``""``. Rebuilding the rows that way from
    ``wiki.test.raw`` gives the identical string.
    """
    root = resolve_data_dir(data_dir)
    if root is None:  # pragma: no cover - needs network
        load_dataset = _hub_load_dataset()
        rows = list(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
    else:
        raw = _data_file(root, "wikitext2", "test").read_text(encoding="utf-8")
        rows = [line if line.strip() else "" for line in raw.splitlines(keepends=True)]
    return "\n\n".join(rows)


def tokenize_corpus(tokenizer, text: str) -> "torch.Tensor":
    """(N,) ids of the whole corpus, tokenized once (special tokens as the tokenizer adds them).

    Used by WikiText-2 perplexity (:mod:`cap_lab.evaluation.perplexity`) and WikiText-2 calibration
    (:mod:`cap_lab.calibration`), so both see the same token positions.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sequence length is longer than the maximum"
        previous = getattr(tokenizer, "model_max_length", None)
        try:
            tokenizer.model_max_length = int(1e30)
            ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
        finally:
            if previous is not None:
                tokenizer.model_max_length = previous
    return ids


def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


def assert_disjoint(calibration: list[Example], evaluation: list[Example]) -> None:
    """Raise ``AssertionError`` if any calibration question text occurs in ``evaluation``."""
    seen = {(e.task, _normalized(e.question)) for e in evaluation}
    clash = [e.uid for e in calibration if (e.task, _normalized(e.question)) in seen]
    assert not clash, f"calibration examples overlap the evaluation split: {clash[:5]}"


def calibration_pool(task: str, data_dir: str | os.PathLike | None = None) -> list[Example]:
    """The train split of ``task`` minus questions that also occur in its evaluation split."""
    train = load_task(task, CALIBRATION_SPLIT[task], data_dir)
    evaluation = load_task(task, EVALUATION_SPLIT[task], data_dir)
    seen = {_normalized(e.question) for e in evaluation}
    pool = [e for e in train if _normalized(e.question) not in seen]
    assert_disjoint(pool, evaluation)
    return pool
