"""Answer extraction, number comparison, chain statistics and Wilson intervals on hand-written strings."""
import math

import pytest

from cap_lab.evaluation.chains import chain_stats, summarize_chains
from cap_lab.evaluation.extraction import answers_match, extract_flexible, extract_strict, normalize_number, numbers_equal
from cap_lab.evaluation.results import wilson_interval

ABCD = ("A", "B", "C", "D")


@pytest.mark.parametrize("a, b, equal", [
    ("18", "18.0", True), ("1,000", "1000", True), ("$1,234.50", "1234.5", True), ("18.", "18", True),
    ("-3", "-3.0", True), ("-3", "3", False), ("0.5", ".5", True), ("7", "70", False), ("abc", "abc", False),
])
def test_numbers_compare_by_exact_value(a, b, equal):
    assert numbers_equal(a, b) is equal


def test_normalize_number_rejects_non_numbers():
    assert normalize_number("") is None and normalize_number("$") is None and normalize_number("1.2.3") is None
    assert normalize_number("$-5.") == normalize_number("-5")


@pytest.mark.parametrize("text, strict, flexible", [
    ("She has 3 + 15 = 18 apples.\nAnswer: 18", "18", "18"),
    ("Total: $1,234.\nAnswer: $1,234.", "1234", "1234"),
    ("The balance changes by -7.5 dollars.\nAnswer: -7.5", "-7.5", "-7.5"),
    ("Answer: 10\nWait, I made a mistake: 5 * 4 = 20.\nAnswer: 20", "20", "20"),  # several answer lines: the last
    ("5 * 4 = 20, so she pays 20 dollars.", None, "20"),  # no answer line
    ("**Answer:** 42 apples", "42", "42"),  # markdown, unit after the number
    ("Answer: The answer is 12", None, "12"),  # malformed answer line
    ("It costs 0.50 each.\nanswer: 18.00", "18", "18"),
    ("Answer: 1,000,000", "1000000", "1000000"),
    ("The sum is 12.\nAnswer:\n12", None, "12"),  # the value must be on the answer line
])
def test_gsm8k_extractors(text, strict, flexible):
    assert extract_strict("gsm8k", text) == strict
    assert extract_flexible("gsm8k", text) == flexible


@pytest.mark.parametrize("text, strict, flexible", [
    ("Penguins cannot fly.\nAnswer: no", "no", "no"),
    ("Yes, it can.\nAnswer: Yes.", "yes", "yes"),
    ("So the answer is yes.", None, "yes"),  # lowercase "yes." without an answer line
    ("Answer: yes\nActually no.\nAnswer: no", "no", "no"),
    ("Answer: maybe", None, None),
    ("It is not knowable.", None, None),  # "not", "knowable" are not "no"
    ("Answer: No, because bees die in winter", "no", "no"),
])
def test_strategyqa_extractors(text, strict, flexible):
    assert extract_strict("strategyqa", text) == strict
    assert extract_flexible("strategyqa", text) == flexible


@pytest.mark.parametrize("text, labels, strict, flexible", [
    ("Plants need light.\nAnswer: (B)", ABCD, "B", "B"),
    ("Answer: C. photosynthesis", ABCD, "C", "C"),
    ("Answer: b", ABCD, "B", None),  # strict is case-insensitive, flexible needs the label itself
    ("A plant needs water, so option D is right.", ABCD, None, "D"),  # the article "A" is no label
    ("The answer is B) mitochondria.", ABCD, None, "B"),
    ("Answer: E", ABCD, None, None),  # not an option of this question
    ("Answer: 3", ("1", "2", "3", "4"), "3", "3"),
    ("Step 2 shows 2.5 grams, so the answer is 4.", ("1", "2", "3", "4"), None, "4"),
    ("Answer: B\nOn reflection the correct option is A.\nAnswer: A", ABCD, "A", "A"),
])
def test_arc_extractors(text, labels, strict, flexible):
    assert extract_strict("arc_challenge", text, labels) == strict
    assert extract_flexible("arc_challenge", text, labels) == flexible


def test_answers_match_and_errors():
    assert answers_match("gsm8k", "18.0", "18") and not answers_match("gsm8k", None, "18")
    assert answers_match("strategyqa", "yes", "yes") and not answers_match("arc_challenge", "A", "B")
    with pytest.raises(ValueError, match="option labels"):
        extract_strict("arc_challenge", "Answer: A")
    with pytest.raises(ValueError, match="unknown task"):
        extract_flexible("mmlu", "Answer: A")


def test_chain_stats_counts_steps_before_the_last_answer_line():
    text = "Step one: 16 - 3 = 13.\n\nStep two: 13 - 4 = 9.\nStep three: 9 * 2 = 18.\nAnswer: 18\n"
    stats = chain_stats(text, generated_tokens=40, truncated=False)
    assert (stats.steps, stats.complete, stats.generated_tokens, stats.truncated) == (3, True, 40, False)
    rambling = chain_stats("first\nsecond\nthird and on and on", generated_tokens=256, truncated=True)
    assert (rambling.steps, rambling.complete) == (3, False)
    summary = summarize_chains([stats, rambling])
    assert summary["complete_rate"] == 0.5 and summary["truncated_rate"] == 0.5
    assert summary["mean_steps"] == 3 and summary["mean_generated_tokens"] == 148
    assert summarize_chains([]) == {"n": 0}


def test_wilson_interval_matches_the_formula():
    low, high = wilson_interval(50, 100)
    assert math.isclose(low, 0.4038, abs_tol=1e-4) and math.isclose(high, 0.5962, abs_tol=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
