"""How a model is evaluated: one frozen settings object for every evaluation function.

:func:`cap_lab.evaluation.evaluate`, :func:`~cap_lab.evaluation.cot.cot_accuracy`,
:func:`~cap_lab.evaluation.loglik.loglik_accuracy` and
:func:`~cap_lab.evaluation.perplexity.wikitext2_perplexity` take an :class:`EvalSettings`
instead of a dozen keyword arguments; where to read data and write runs stays an argument of
the call. Every field that changes a number is part of the saved run's key; ``batch_size``
changes only the speed (batched results equal unbatched ones, see the tests).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

MODES = ("cot", "loglik")
PROMPT_STYLES = ("auto", "chat", "plain")


@dataclass(frozen=True)
class EvalSettings:
    """Evaluation settings (paper Sec. 4; Table 1).

    Attributes:
        mode: how reasoning tasks are scored: ``cot`` (greedy chain-of-thought accuracy) or
            ``loglik`` (option log-likelihood accuracy; StrategyQA and ARC-Challenge only).
        limit: a seeded random subset of this many examples per reasoning task (``None``: the
            whole evaluation split).
        seed: the subset's seed.
        max_new_tokens: CoT generation cap (``None``: 512 for GSM8K, 256 otherwise).
        prompt_style: ``auto`` (chat template when the tokenizer has one), ``chat`` or ``plain``.
        ppl_seqlen: WikiText-2 window length in tokens (capped by the model's context).
        ppl_windows: WikiText-2 windows (paper: 100; ``None``: every complete window).
        batch_size: prompts (CoT) or sequences (log-likelihood) per forward.
    """

    mode: str = "cot"
    limit: int | None = None
    seed: int = 0
    max_new_tokens: int | None = None
    prompt_style: str = "auto"
    ppl_seqlen: int = 2048
    ppl_windows: int | None = 100
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; allowed: {', '.join(MODES)}")
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style={self.prompt_style!r}; allowed: {', '.join(PROMPT_STYLES)}")
        for name, low, optional in (("limit", 1, True), ("max_new_tokens", 1, True), ("ppl_windows", 1, True),
                                    ("ppl_seqlen", 2, False), ("batch_size", 1, False)):
            value = getattr(self, name)
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                allowed = f"an integer >= {low}" + (" or None" if optional else "")
                raise ValueError(f"{name}={value!r}; must be {allowed}")

    def to_dict(self) -> dict:
        return asdict(self)
