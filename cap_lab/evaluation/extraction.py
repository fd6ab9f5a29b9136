"""Final-answer extraction from chain-of-thought generations (paper Sec. 4, App. B).

The evaluation prompts (:data:`cap_lab.prompts.COT_INSTRUCTIONS`) ask the model to end with one
line in a strict format: ``Answer: <number>`` (GSM8K), ``Answer: yes|no`` (StrategyQA) and
``Answer: <letter>`` (ARC-Challenge). Two extractors read a generation:

* **strict** (the paper's metric): the *last* answer line, ``Answer: <value>`` at the start of a
  line (case-insensitive; markdown emphasis such as ``**Answer:**`` is tolerated), whose value
  starts with a well-formed answer: a number (GSM8K, ``$`` allowed), ``yes``/``no``
  (StrategyQA), or one of the question's option labels, bare or as ``(B)``, ``B.``, ``B)``
  (ARC). Text after the answer on that line (units, the option's text) is ignored. No such
  line, or a malformed value on the last one, gives ``None``.
* **flexible**: GSM8K the last number anywhere in the text; StrategyQA the last standalone
  ``yes``/``no``; ARC the last standalone option label (an uppercase ``A`` followed by a
  lowercase word is read as the article, not a label).

Numbers compare as exact values after removing ``,`` and ``$`` and a trailing ``.``:
``"1,000"`` equals ``1000``, ``"18.0"`` equals ``"18"``, ``"-3.5"`` is negative.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# a number: optional sign and dollar sign, digits with proper thousands groups or plain, decimals
_NUMBER = r"-?\$?-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\$?-?\.\d+"
_NUMBER_RE = re.compile(rf"(?<![\w.])(?:{_NUMBER})")
# "Answer: ..." at the start of a line, tolerating markdown emphasis / list markers around it
ANSWER_LINE = re.compile(r"^[ \t>*_#-]*(?:final[ \t]+)?answer[ \t*_]*:[ \t*_]*(?P<value>.*?)[ \t]*$", re.IGNORECASE | re.MULTILINE)
_YES_NO = re.compile(r"(?<![A-Za-z])(yes|no)(?![A-Za-z])", re.IGNORECASE)

ANSWER_TASKS = ("gsm8k", "strategyqa", "arc_challenge")


def normalize_number(text: str) -> Decimal | None:
    """The exact value of a number string, or ``None`` if it is not one.

    ``,`` and ``$`` are removed and a trailing ``.`` is dropped, so ``"$1,234."`` is 1234.

    >>> normalize_number("$1,234.50") == normalize_number("1234.5")
    True
    """
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if not cleaned:
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Whether two number strings have the same exact value (``"18"`` equals ``"18.0"``)."""
    if a is None or b is None:
        return False
    x, y = normalize_number(a), normalize_number(b)
    return x is not None and y is not None and x == y


def _canonical_number(match: str) -> str | None:
    value = normalize_number(match)
    if value is None:
        return None
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def answer_lines(text: str) -> list[str]:
    """The values of every ``Answer: <value>`` line in ``text``, in order."""
    return [m.group("value") for m in ANSWER_LINE.finditer(text)]


def _label_pattern(labels: tuple[str, ...]) -> str:
    return "|".join(re.escape(lab) for lab in sorted(labels, key=len, reverse=True))


def _strict_value(task: str, value: str, labels: tuple[str, ...]) -> str | None:
    value = value.strip().strip("*_`").strip()
    if task == "gsm8k":
        m = re.match(rf"(?:{_NUMBER})(?![\d,])", value)
        return _canonical_number(m.group(0)) if m else None
    if task == "strategyqa":
        m = re.match(r"(yes|no)(?![A-Za-z])", value, re.IGNORECASE)
        return m.group(1).lower() if m else None
    if task == "arc_challenge":
        pattern = _label_pattern(labels)
        m = re.match(rf"\(?({pattern})\)?(?=$|[\s.,:;)\]])", value, re.IGNORECASE if not labels[0].isdigit() else 0)
        if not m:
            return None
        found = m.group(1).upper()
        return found if found in labels else None
    raise ValueError(f"unknown task {task!r}; allowed: {', '.join(ANSWER_TASKS)}")


def extract_strict(task: str, text: str, labels: tuple[str, ...] = ()) -> str | None:
    """The answer on the last ``Answer:`` line of ``text``, or ``None``.

    Args:
        task: ``gsm8k``, ``strategyqa`` or ``arc_challenge``.
        text: the model's generation.
        labels: ARC's option labels (``("A", "B", "C", "D")`` or ``("1", "2", "3", "4")``).

    Returns:
        GSM8K a canonical number string (``"18"``, ``"-3.5"``), StrategyQA ``"yes"``/``"no"``,
        ARC the label; ``None`` when the last answer line is missing or malformed.

    >>> extract_strict("gsm8k", "3 + 15 = 18\\nAnswer: $18.")
    '18'
    """
    if task == "arc_challenge" and not labels:
        raise ValueError("ARC extraction needs the question's option labels")
    values = answer_lines(text)
    return _strict_value(task, values[-1], tuple(labels)) if values else None


def extract_flexible(task: str, text: str, labels: tuple[str, ...] = ()) -> str | None:
    """A lenient answer: the last number / yes-no / standalone option label in ``text``.

    Same arguments and return values as :func:`extract_strict`.
    """
    if task == "gsm8k":
        numbers = [n for n in (_canonical_number(m) for m in _NUMBER_RE.findall(text)) if n is not None]
        return numbers[-1] if numbers else None
    if task == "strategyqa":
        found = _YES_NO.findall(text)
        return found[-1].lower() if found else None
    if task == "arc_challenge":
        if not labels:
            raise ValueError("ARC extraction needs the question's option labels")
        pattern = _label_pattern(tuple(labels))
        # standalone: no letter or digit on either side, not part of a decimal number
        standalone = re.compile(rf"(?<![A-Za-z0-9])(?<!\d\.)({pattern})(?![A-Za-z0-9])(?!\.\d)")
        found = [m.group(1) for m in standalone.finditer(text)
                 if not (m.group(1) == "A" and re.match(r" [a-z]", text[m.end():m.end() + 2]))]  # "A plant"
        return found[-1] if found else None
    raise ValueError(f"unknown task {task!r}; allowed: {', '.join(ANSWER_TASKS)}")


def answers_match(task: str, predicted: str | None, gold: str) -> bool:
    """Whether an extracted answer equals the gold one (numbers by exact value)."""
    if predicted is None:
        return False
    if task == "gsm8k":
        return numbers_equal(predicted, gold)
    return predicted.strip().lower() == gold.strip().lower()
