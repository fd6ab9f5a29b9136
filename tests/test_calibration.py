import random

import pytest

from cap_lab.calibration import CalibrationConfig, _truncate, build_calibration_set, stratified_sample
from cap_lab.data import TASKS


def test_subsets_are_disjoint_balanced_and_hold_every_task(tiny, data_dir):
    cfg = CalibrationConfig(n_per_task=6, n_subsets=3, max_length=64)
    c = build_calibration_set(tiny.tokenizer, cfg, data_dir)
    assert len(c.items) == 18
    uids = [(it.example.task, it.example.uid) for it in c.items]
    assert len(set(uids)) == len(uids)
    for k in range(3):
        tasks = [it.example.task for it in c.items if it.subset == k]
        assert sorted(set(tasks)) == sorted(TASKS) and len(tasks) == 6


def test_seeded_and_seed_sensitive(tiny, data_dir):
    def uids(seed):
        cfg = CalibrationConfig(n_per_task=4, n_subsets=2, seed=seed, max_length=64)
        return [it.example.uid for it in build_calibration_set(tiny.tokenizer, cfg, data_dir).items]

    assert uids(0) == uids(0)
    assert uids(0) != uids(1)


def test_labels_cover_only_target_tokens(tiny, data_dir):
    c = build_calibration_set(tiny.tokenizer, CalibrationConfig(n_per_task=2, n_subsets=2, max_length=400), data_dir)
    batch = next(c.batches(list(range(len(c.items))), 6))
    for row, i in enumerate(batch.items):
        it = c.items[i]
        labelled = (batch.labels[row] != -100).nonzero().squeeze(1).tolist()
        assert labelled == list(range(it.target_start, len(it.input_ids)))
        target_text = tiny.tokenizer.decode(it.input_ids[it.target_start:])
        assert ("####" in target_text) or ("Answer:" in target_text)
    assert c.style == "chat"


def test_stratified_sample_spreads_over_quartiles():
    items = list(range(100))
    lengths = list(range(100))
    chosen = stratified_sample(items, lengths, 10, random.Random(0))
    quartiles = sorted(q for _, q in chosen)
    assert [quartiles.count(q) for q in range(4)] in ([3, 3, 2, 2], [3, 2, 3, 2], [3, 2, 2, 3], [2, 3, 3, 2], [2, 3, 2, 3], [2, 2, 3, 3])
    for item, q in chosen:
        assert q == item // 25


def test_truncation_keeps_target_and_prompt_tail():
    p, t = _truncate(list(range(100)), list(range(100, 150)), 60)
    assert len(p) + len(t) == 60 and t == list(range(100, 130)) and p == list(range(70, 100))
    p, t = _truncate([1, 2], [3, 4], 10)
    assert (p, t) == ([1, 2], [3, 4])


@pytest.mark.parametrize("kwargs, needle", [
    (dict(n_per_task=2, n_subsets=3), "n_per_task=2"),
    (dict(n_subsets=0), "n_subsets=0"),
    (dict(tasks=("gsm8k", "mmlu")), "mmlu"),
    (dict(prompt_style="fancy"), None),
])
def test_bad_config_raises_value_error(kwargs, needle, tiny, data_dir):
    if needle is None:
        with pytest.raises(ValueError, match="fancy"):
            build_calibration_set(tiny.tokenizer, CalibrationConfig(**kwargs), data_dir)
    else:
        with pytest.raises(ValueError, match=needle):
            CalibrationConfig(**kwargs)
