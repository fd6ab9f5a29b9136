"""WikiText-2-calibrated CAP (paper Sec. 6, "Effect of reasoning-focused calibration").

The fixture's WikiText-2 file holds ~1,500 character tokens, so the reserved evaluation prefix
(:data:`cap_lab.calibration.WIKITEXT2_EVAL_TOKENS`, 204,800 tokens for real) is monkeypatched
to 300 tokens here; one test checks the real value against every evaluation setting.
"""
import pytest

import cap_lab.calibration as calibration
from cap_lab.calibration import CalibrationConfig, build_calibration_set
from cap_lab.config import PROFILES
from cap_lab.data import load_wikitext2_test, tokenize_corpus
from cap_lab.evaluation.settings import EvalSettings

RESERVED = 300


@pytest.fixture
def reserved(monkeypatch):
    monkeypatch.setattr(calibration, "WIKITEXT2_EVAL_TOKENS", RESERVED)
    return RESERVED


def _wikitext(tiny, data_dir, **kwargs):
    config = CalibrationConfig(**{"n_per_task": 4, "n_subsets": 2, "max_length": 16, "source": "wikitext2", **kwargs})
    return build_calibration_set(tiny.tokenizer, config, data_dir)


def test_items_are_windows_of_the_corpus_dealt_into_the_subsets(tiny, data_dir, reserved):
    calib = _wikitext(tiny, data_dir)
    ids = tokenize_corpus(tiny.tokenizer, load_wikitext2_test(data_dir)).tolist()
    assert len(calib.items) == 3 * 4 and calib.style == "plain"
    assert sorted(sum(it.subset == k for it in calib.items) for k in range(2)) == [6, 6]
    for it in calib.items:
        start = int(it.example.uid.removeprefix("wikitext2-"))
        assert it.example.task == "wikitext2" and it.quartile == 0
        assert list(it.input_ids) == ids[start:start + 16]
        assert it.target_start == 1 and it.n_target == 15  # every token but the first is a target
        assert (len(ids) - start) % 16 == 0  # tiled backwards from the end of the corpus


def test_windows_are_disjoint_and_after_the_evaluation_region(tiny, data_dir, reserved):
    calib = _wikitext(tiny, data_dir, n_per_task=10, n_subsets=3)
    starts = sorted(int(it.example.uid.removeprefix("wikitext2-")) for it in calib.items)
    assert starts[0] >= RESERVED
    assert all(b - a >= 16 for a, b in zip(starts, starts[1:]))


def test_every_token_after_the_first_carries_the_loss(tiny, data_dir, reserved):
    calib = _wikitext(tiny, data_dir)
    batch = next(calib.batches(list(range(len(calib.items))), 12))
    assert (batch.labels[:, 0] == -100).all() and (batch.labels[:, 1:] == batch.input_ids[:, 1:]).all()
    assert batch.attention_mask.all()


def test_seeded_and_seed_sensitive(tiny, data_dir, reserved):
    def windows(seed, draw=None):
        return [it.example.uid for it in _wikitext(tiny, data_dir, seed=seed, draw=draw).items]

    assert windows(0) == windows(0)
    assert windows(0) != windows(1)
    assert not set(windows(0, draw=0)) & set(windows(0, draw=1))  # the two draws share no window


def test_too_few_windows_after_the_evaluation_region_are_refused(tiny, data_dir, reserved):
    with pytest.raises(ValueError, match="needs 300 windows of max_length=16 tokens, but only .* fit in tokens 300"):
        _wikitext(tiny, data_dir, n_per_task=100)


def test_the_reserved_region_covers_every_evaluation_setting():
    largest = [EvalSettings().ppl_windows * EvalSettings().ppl_seqlen]
    largest += [p.eval.ppl_windows * p.eval.ppl_seqlen for p in PROFILES.values()]
    assert max(largest) <= calibration.WIKITEXT2_EVAL_TOKENS == 204_800


def test_the_reasoning_default_is_unchanged(tiny, data_dir):
    default = CalibrationConfig()
    assert default.source == "reasoning" and "source" not in default.to_dict()
    assert CalibrationConfig(source="wikitext2").to_dict()["source"] == "wikitext2"
    calib = build_calibration_set(tiny.tokenizer, CalibrationConfig(n_per_task=2, n_subsets=2, max_length=64), data_dir)
    assert {it.example.task for it in calib.items} == {"gsm8k", "strategyqa", "arc_challenge"}


def test_a_bad_source_is_refused_naming_it():
    with pytest.raises(ValueError, match="source='c4'; allowed: reasoning, wikitext2"):
        CalibrationConfig(source="c4")
