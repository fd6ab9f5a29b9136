"""Every text format in one place: calibration input/target pairs and evaluation prompts.

The paper (Sec. 3.1, App. B) gives neither its calibration targets nor, in our copy, its
prompt templates, so these are our choices, versioned by :data:`FORMAT_VERSION` (part of every
score-cache key: change a template here and bump it).

Calibration pairs (paper Sec. 3.1, 3.4): the input is the question with a generic
step-by-step instruction (ARC lists its options as ``A. ...``); the target, whose tokens alone
carry the loss, is

* GSM8K: the gold worked solution, calculator annotations ``<<48/2=24>>`` removed by default
  (the model never writes them), ending in the dataset's ``#### n`` line (or ``Answer: n`` with
  ``gsm8k_final="answer_line"``);
* ARC-Challenge: the correct option stated, then a final ``Answer: <label>`` line;
* StrategyQA: the gold facts, then a final ``Answer: yes|no`` line.

Rendering: with the model's chat template when it has one (the prompt is one user turn and
the generation prompt), else a plain ``Question: ... / Answer:`` format. ``style="auto"``
picks between them.

Evaluation prompts (paper Sec. 4, App. B) ask for chain-of-thought reasoning that ends with
one line in a strict format: ``Answer: <number>`` (GSM8K), ``Answer: yes|no`` (StrategyQA),
``Answer: <letter>`` (ARC, options listed as ``A. ...``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from cap_lab.data import Example

FORMAT_VERSION = "v1"
PROMPT_STYLES = ("auto", "chat", "plain")
GSM8K_FINALS = ("hashes", "answer_line")
_CALCULATOR = re.compile(r"<<[^<>]*>>")


@dataclass(frozen=True)
class TargetFormat:
    """How calibration targets are written (see the module docstring).

    Attributes:
        gsm8k_final: ``"hashes"`` keeps GSM8K's ``#### n`` line; ``"answer_line"`` writes
            ``Answer: n`` like the evaluation format.
        strip_calculator: remove GSM8K's ``<<a*b=c>>`` calculator annotations.
    """

    gsm8k_final: str = "hashes"
    strip_calculator: bool = True

    def __post_init__(self) -> None:
        if self.gsm8k_final not in GSM8K_FINALS:
            raise ValueError(f"gsm8k_final={self.gsm8k_final!r}; allowed: {', '.join(GSM8K_FINALS)}")


def options_block(example: Example) -> str:
    """ARC options, one per line: ``A. first choice``."""
    return "\n".join(f"{label}. {text}" for label, text in example.choices)


def question_block(example: Example) -> str:
    """``Question: ...`` plus the options for multiple-choice tasks."""
    text = f"Question: {example.question}"
    return f"{text}\n{options_block(example)}" if example.choices else text


CALIBRATION_INSTRUCTION = "Think step by step, then give the final answer."


def calibration_target(example: Example, fmt: TargetFormat = TargetFormat()) -> str:
    """The gold reasoning-and-answer text whose tokens carry the calibration loss."""
    if example.task == "gsm8k":
        solution = _CALCULATOR.sub("", example.solution) if fmt.strip_calculator else example.solution
        final = f"#### {example.gold}" if fmt.gsm8k_final == "hashes" else f"Answer: {example.gold}"
        return f"{solution}\n{final}"
    if example.task == "arc_challenge":
        text = dict(example.choices)[example.gold]
        return f"The correct option is {example.gold}. {text}\nAnswer: {example.gold}"
    if example.task == "strategyqa":
        return "\n".join(example.facts + (f"Answer: {example.gold}",))
    raise ValueError(f"unknown task {example.task!r}")


# ------------------------------------------------------------------ evaluation prompts
COT_INSTRUCTIONS = {
    # Chosen on 16 train/validation examples per task (never the test splits): against a
    # shorter "reason step by step, then write the final answer..." wording, these made
    # SmolLM2-135M-Instruct write longer chains (GSM8K 13 vs 5 lines) with the answer line
    # more often (GSM8K 25% vs 6%). On 100 test examples per task neither wording gets a
    # strict answer line from that model more than 1 time in 100 (it is too small to follow
    # the format); larger instruction-tuned models are the target. "One short step per line"
    # makes the line-based step count of cap_lab.evaluation.chains meaningful.
    "gsm8k": (
        "Solve the math problem below. Explain your reasoning step by step, one short step per "
        "line. Then end your reply with a line that says exactly \"Answer: <number>\", for "
        "example \"Answer: 42\"."
    ),
    "strategyqa": (
        "Answer the yes/no question below. Explain your reasoning step by step in a few short "
        "sentences. Then end your reply with a line that says exactly \"Answer: yes\" or "
        "\"Answer: no\"."
    ),
    "arc_challenge": (
        "Answer the multiple-choice science question below. Explain your reasoning step by step "
        "in a few short sentences. Then end your reply with a line that says exactly "
        "\"Answer: <label>\", where <label> is the label of the correct option, for example "
        "\"Answer: B\"."
    ),
}


def cot_user_text(example: Example) -> str:
    """The user message of a chain-of-thought evaluation prompt."""
    return f"{COT_INSTRUCTIONS[example.task]}\n\n{question_block(example)}"


def calibration_user_text(example: Example) -> str:
    """The user message of a calibration input."""
    return f"{CALIBRATION_INSTRUCTION}\n\n{question_block(example)}"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_style(tokenizer, style: str = "auto") -> str:
    """``"chat"`` or ``"plain"``: ``auto`` uses the chat template when the tokenizer has one."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style {style!r}; allowed: {', '.join(PROMPT_STYLES)}")
    if style == "auto":
        return "chat" if has_chat_template(tokenizer) else "plain"
    if style == "chat" and not has_chat_template(tokenizer):
        raise ValueError("prompt style 'chat' asked for, but the tokenizer has no chat template")
    return style


def render_prompt(tokenizer, user_text: str, style: str = "auto") -> str:
    """The full prompt string, ending where the model's answer begins.

    ``chat``: the tokenizer's chat template with one user turn and the generation prompt
    (the template adds BOS itself where the model needs it, so encode the result with
    ``add_special_tokens=False``). ``plain``: ``user_text`` followed by ``\\nAnswer:``.
    """
    if resolve_style(tokenizer, style) == "chat":
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
    return f"{user_text}\nAnswer:"


def encode_prompt(tokenizer, user_text: str, style: str = "auto") -> list[int]:
    """Token ids of :func:`render_prompt` (BOS added for the plain style where the tokenizer uses one)."""
    chat = resolve_style(tokenizer, style) == "chat"
    text = render_prompt(tokenizer, user_text, style)
    return tokenizer(text, add_special_tokens=not chat)["input_ids"]


def encode_continuation(tokenizer, text: str, style: str = "auto") -> list[int]:
    """Token ids of a target/continuation that follows the prompt (no special tokens).

    In the plain style the target follows ``Answer:`` after a space.
    """
    prefix = " " if resolve_style(tokenizer, style) == "plain" else ""
    return tokenizer(prefix + text, add_special_tokens=False)["input_ids"]
