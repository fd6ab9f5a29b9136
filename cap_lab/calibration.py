"""The reasoning calibration set (paper Sec. 3.1 and 3.4).

``n_per_task`` examples are drawn from each task's train split (questions that also occur in
the evaluation split are excluded first, see :func:`cap_lab.data.calibration_pool`),
stratified over the quartiles of example length (question plus target, in characters: a rough
proxy for problem complexity that does not depend on the tokenizer, so every model is
calibrated on the same questions), with a fixed seed. The examples are then dealt into K
disjoint subsets so that each subset holds every task in near-equal shares.

Disjoint draws (the head-score stability study, :mod:`cap_lab.stability`): with ``draw`` set to
0 or 1, each task's pool is first split into two halves by a fixed permutation (seeded by
:data:`DRAW_SPLIT_SEED` and the task name, independent of ``seed`` and ``n_per_task``), and the
examples are sampled from that half only. Draws 0 and 1 therefore never share an example,
whatever their sizes and seeds; ``draw=None`` (the default, the paper's setting) samples the
whole pool.

Each example is an input-target pair (texts in :mod:`cap_lab.prompts`); only target tokens
carry the loss. When prompt plus target exceed ``max_length`` tokens the target keeps at least
half the budget (its tail is cut) and the prompt is cut from the left.

The loss of a subset is the token-level mean cross-entropy over all target tokens of the
subset (paper Eq. 1: "token-level cross-entropy"); per-example sums and counts are kept so
other aggregations need no new forward pass.

WikiText-2 calibration (``source="wikitext2"``, the ablation of paper Sec. 6, "Effect of
reasoning-focused calibration": CAP calibrated on WikiText-2 samples of comparable size): the
same number of items, ``len(tasks) * n_per_task``, each a window of ``max_length`` tokens of the
WikiText-2 raw test split (the only WikiText-2 split in a data dir), tokenized once as the
perplexity evaluation tokenizes it (:func:`cap_lab.data.tokenize_corpus`).
Every token but the first is a target (``target_start = 1``: the first only conditions). The
candidate windows tile the corpus backwards from its END without overlap, and only tokens at
or after :data:`WIKITEXT2_EVAL_TOKENS` are used: perplexity evaluates the first
``ppl_windows * ppl_seqlen`` tokens, at most 100 x 2048 = 204,800 (the paper's protocol,
``EvalSettings``' default and the largest of any profile), so calibration and evaluation never
share a token (an ``assert`` checks every window; an evaluation of *every* window, ``ppl_windows
= None``, does overlap). A seeded random sample of the candidates, in random order, is dealt
into the K subsets in turn; ``draw`` 0/1 samples only the even/odd candidates. Each item's
``example`` is an :class:`~cap_lab.data.Example` with task ``wikitext2`` and uid
``wikitext2-<first token>``; its quartile is 0. The set's ``style`` is ``plain`` (no template).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
import torch

from cap_lab.data import TASKS, Example, calibration_pool, load_wikitext2_test, tokenize_corpus

#: the seed of the fixed split of every pool into the halves that ``draw`` 0 and 1 sample from
DRAW_SPLIT_SEED = 20260507
N_DRAWS = 2
CALIBRATION_SOURCES = ("reasoning", "wikitext2")
#: WikiText-2 calibration windows start at or after this token of the test split; perplexity
#: evaluates at most the first 100 x 2048 tokens (the paper's protocol, EvalSettings' default)
WIKITEXT2_EVAL_TOKENS = 100 * 2048
from cap_lab.prompts import (
    FORMAT_VERSION, TargetFormat, calibration_target, calibration_user_text, encode_continuation,
    encode_prompt, resolve_style,
)


@dataclass(frozen=True)
class CalibrationConfig:
    """Settings of a calibration set; every field is part of the score-cache key.

    Attributes:
        tasks: benchmarks to draw from (paper: GSM8K, StrategyQA, ARC-Challenge).
        n_per_task: examples per task (paper: 128-256; any n >= n_subsets).
        n_subsets: K disjoint subsets for the median estimate (paper: 3-5).
        seed: sampling seed (paper: 0).
        max_length: token cap per example.
        prompt_style: ``auto`` (chat template when the tokenizer has one), ``chat`` or ``plain``.
        target: the target text format.
        draw: ``None`` (whole pool, the default) or 0/1: sample only from that half of each
            task's pool, so two draws never share an example (see the module docstring).
        source: ``reasoning`` (the paper's tasks) or ``wikitext2``: ``len(tasks) * n_per_task``
            windows of ``max_length`` WikiText-2 tokens (Sec. 6 ablation; module docstring).
    """

    tasks: tuple[str, ...] = TASKS
    n_per_task: int = 128
    n_subsets: int = 3
    seed: int = 0
    max_length: int = 512
    prompt_style: str = "auto"
    target: TargetFormat = field(default_factory=TargetFormat)
    draw: int | None = None
    source: str = "reasoning"

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"tasks={list(self.tasks)!r}; allowed: {', '.join(TASKS)}")
        if self.n_subsets < 1:
            raise ValueError(f"n_subsets={self.n_subsets}; must be >= 1")
        if self.n_per_task < self.n_subsets:
            raise ValueError(
                f"n_per_task={self.n_per_task} is smaller than n_subsets={self.n_subsets}; "
                "every subset needs at least one example of each task"
            )
        if self.max_length < 8:
            raise ValueError(f"max_length={self.max_length}; must be >= 8")
        if self.draw is not None and (type(self.draw) is not int or not 0 <= self.draw < N_DRAWS):
            raise ValueError(f"draw={self.draw!r}; allowed: None (whole pool) or 0..{N_DRAWS - 1}")
        if self.source not in CALIBRATION_SOURCES:
            raise ValueError(f"source={self.source!r}; allowed: {', '.join(CALIBRATION_SOURCES)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        if d["draw"] is None:  # the whole pool: the same key as before draws existed
            del d["draw"]
        if d["source"] == "reasoning":  # the paper's source: the same key as before sources existed
            del d["source"]
        d["format_version"] = FORMAT_VERSION
        return d


@dataclass(frozen=True)
class CalibrationItem:
    """One tokenized calibration example.

    Attributes:
        example: the source record.
        quartile: length quartile (0 = shortest) within its task's pool.
        subset: which of the K subsets it belongs to.
        input_ids: prompt followed by target token ids.
        target_start: index of the first target token in ``input_ids``.
    """

    example: Example
    quartile: int
    subset: int
    input_ids: tuple[int, ...]
    target_start: int

    @property
    def n_target(self) -> int:
        return len(self.input_ids) - self.target_start


@dataclass(frozen=True)
class Batch:
    """A right-padded batch. Shapes: ``input_ids``, ``attention_mask``, ``labels``: (B, S).

    ``labels`` is -100 except at target tokens; ``items`` are indices into the set's items.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    items: tuple[int, ...]


@dataclass(frozen=True)
class CalibrationSet:
    config: CalibrationConfig
    style: str
    items: tuple[CalibrationItem, ...]
    pad_token_id: int

    @property
    def n_tokens(self) -> int:
        return sum(len(it.input_ids) for it in self.items)

    @property
    def n_target_tokens(self) -> int:
        return sum(it.n_target for it in self.items)

    def token_digest(self) -> str:
        """SHA-256 of every item's subset, target start and token ids, in order.

        Two sets with the same digest feed a model exactly the same tokens and losses; a
        changed chat template or tokenizer changes it even when every setting is equal.
        """
        h = hashlib.sha256()
        for it in self.items:
            h.update(f"{it.subset}:{it.target_start}:{','.join(map(str, it.input_ids))};".encode())
        return h.hexdigest()

    def batches(self, indices: list[int], batch_size: int, device="cpu") -> Iterator[Batch]:
        """Batches of the given items, sorted by length (less padding), right-padded."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; must be >= 1")
        order = sorted(indices, key=lambda i: len(self.items[i].input_ids))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            yield make_batch([self.items[i] for i in chunk], tuple(chunk), self.pad_token_id, device)

    def to_frame(self):
        """One row per example: task, subset, quartile, tokens, target tokens."""
        import pandas as pd

        return pd.DataFrame([
            dict(task=it.example.task, uid=it.example.uid, subset=it.subset, quartile=it.quartile,
                 tokens=len(it.input_ids), target_tokens=it.n_target)
            for it in self.items
        ])


def make_batch(items: list[CalibrationItem], index: tuple[int, ...], pad_id: int, device) -> Batch:
    width = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    for r, it in enumerate(items):
        n = len(it.input_ids)
        ids[r, :n] = torch.tensor(it.input_ids)
        mask[r, :n] = 1
        labels[r, it.target_start:n] = ids[r, it.target_start:n]
    return Batch(ids.to(device), mask.to(device), labels.to(device), index)


def stratified_sample(pool: list[Example], lengths: list[int], n: int, rng: random.Random) -> list[tuple[Example, int]]:
    """``n`` examples spread evenly over the length quartiles of ``pool``: ``(example, quartile)``."""
    if n > len(pool):
        raise ValueError(f"asked for {n} examples but the pool holds {len(pool)}")
    edges = np.quantile(np.asarray(lengths), [0.25, 0.5, 0.75])
    quart = np.searchsorted(edges, np.asarray(lengths), side="right")
    bins = [[i for i in range(len(pool)) if quart[i] == q] for q in range(4)]
    want = [n // 4] * 4
    for q in rng.sample(range(4), n % 4):
        want[q] += 1
    chosen = []
    for q in range(4):  # a short bin (ties at an edge) passes its shortfall on
        take = min(want[q], len(bins[q]))
        if q < 3:
            want[q + 1] += want[q] - take
        chosen += [(pool[i], q) for i in rng.sample(bins[q], take)]
    assert len(chosen) == n, (len(chosen), n)
    return chosen


def draw_pool(pool: list[Example], task: str, draw: int | None) -> list[Example]:
    """The half of ``pool`` that ``draw`` samples from (the whole pool when ``draw`` is None).

    The halves come from one fixed permutation per task, so they are disjoint and cover the pool.
    """
    if draw is None:
        return pool
    order = list(range(len(pool)))
    random.Random(f"{DRAW_SPLIT_SEED}:{task}").shuffle(order)
    return [pool[i] for i in sorted(order[draw::N_DRAWS])]


def _truncate(prompt: list[int], target: list[int], max_length: int) -> tuple[list[int], list[int]]:
    if len(prompt) + len(target) <= max_length:
        return prompt, target
    keep_target = max(max_length - len(prompt), min(len(target), max_length // 2))
    target = target[:keep_target]
    return prompt[len(prompt) - (max_length - len(target)):], target


def build_calibration_set(tokenizer, config: CalibrationConfig = CalibrationConfig(), data_dir=None) -> CalibrationSet:
    """Sample, split and tokenize the calibration set.

    Args:
        tokenizer: the model's tokenizer (chat template used when it has one).
        config: sizes, seed and formats.
        data_dir: data folder (else ``$CAP_LAB_DATA``, else the hub).

    Returns:
        A :class:`CalibrationSet` of ``len(tasks) * n_per_task`` items in K subsets (reasoning
        examples, or WikiText-2 windows with ``source="wikitext2"``).
    """
    if config.source == "wikitext2":
        return CalibrationSet(config, "plain", wikitext2_items(tokenizer, config, data_dir), int(tokenizer.pad_token_id))
    style = resolve_style(tokenizer, config.prompt_style)
    items: list[CalibrationItem] = []
    for t_index, task in enumerate(config.tasks):
        rng = random.Random(f"{config.seed}:{task}")
        pool = draw_pool(calibration_pool(task, data_dir), task, config.draw)
        lengths = [len(e.question) + len(calibration_target(e, config.target)) for e in pool]
        chosen = stratified_sample(pool, lengths, config.n_per_task, rng)
        rng.shuffle(chosen)
        for j, (example, quartile) in enumerate(chosen):
            prompt = encode_prompt(tokenizer, calibration_user_text(example), style)
            target = encode_continuation(tokenizer, calibration_target(example, config.target), style)
            prompt, target = _truncate(prompt, target, config.max_length)
            subset = (j + t_index) % config.n_subsets  # rotate so subset sizes stay balanced
            items.append(CalibrationItem(example, quartile, subset, tuple(prompt + target), len(prompt)))
    return CalibrationSet(config, style, tuple(items), int(tokenizer.pad_token_id))


def wikitext2_items(tokenizer, config: CalibrationConfig, data_dir=None) -> tuple[CalibrationItem, ...]:
    """``len(tasks) * n_per_task`` WikiText-2 windows of ``max_length`` tokens (see the module docstring).

    Raises:
        ValueError: the corpus after :data:`WIKITEXT2_EVAL_TOKENS` holds too few windows (says how many fit).
    """
    ids = tokenize_corpus(tokenizer, load_wikitext2_test(data_dir))  # (N,)
    length, n = config.max_length, len(config.tasks) * config.n_per_task
    starts = list(range(ids.numel() - length, WIKITEXT2_EVAL_TOKENS - 1, -length))  # from the end, backwards
    if config.draw is not None:
        starts = starts[config.draw::N_DRAWS]
    if n > len(starts):
        raise ValueError(f"WikiText-2 calibration needs {n} windows of max_length={length} tokens, but only "
                         f"{len(starts)} fit in tokens {WIKITEXT2_EVAL_TOKENS:,}..{ids.numel():,} of the test split "
                         f"(the tokens before are perplexity's); lower max_length or n_per_task")
    chosen = random.Random(f"{config.seed}:wikitext2").sample(starts, n)  # seeded, in random order
    items = []
    for j, start in enumerate(chosen):
        assert start >= WIKITEXT2_EVAL_TOKENS and start + length <= ids.numel(), (start, length)
        example = Example("wikitext2", f"wikitext2-{start}", question="", gold="")
        items.append(CalibrationItem(example, 0, j % config.n_subsets, tuple(ids[start:start + length].tolist()), 1))
    return tuple(items)
