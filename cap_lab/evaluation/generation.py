"""Batched greedy decoding with left padding and the KV cache (paper Sec. 4: temperature 0).

:func:`generate_greedy` decodes many prompts at once and returns, for each prompt, exactly
the tokens that decoding that prompt alone would give:

* prompts are sorted by length and cut into batches of ``batch_size`` (less padding);
* the tokens that every prompt starts with (system prompt, chat header, instruction: about
  half of an evaluation prompt) are run once per call; each batch starts from a copy of that
  prefix's KV cache (:func:`common_prefix_length`);
* the rest of each prompt is **left-padded** after the prefix; the attention mask hides the
  padding and the position ids count real tokens only (``cumsum(mask) - 1``), so every row
  sees what it would see alone;
* one prefill forward fills the KV cache (logits only for the last position), then one
  forward per new token feeds the argmax of the previous step;
* a row stops at a stop token (EOS, and for chat models the end-of-turn token, see
  :func:`stop_token_ids`) or after ``max_new_tokens``; finished rows are dropped from the
  batch and the cache (``batch_select_indices``), so the survivors run at their own cost.

Ties in the argmax resolve to the lowest token id, as in ``torch.argmax``. Equality with
unbatched decoding holds up to floating-point differences between batch shapes (a near-tie
in a long chain can flip); the tests check it exactly on tiny float32 models, including a
Gemma-3 model whose sliding window is shorter than the padded prompts. Padding between the
shared prefix and a row's own tokens would take places in a sliding attention window, so
the prefix is not shared when a model's window is shorter than the longest padded sequence.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from cap_lab.modeling import lm_forward, model_device, repeat_cache, select_cache

#: share a common prompt prefix only when it is at least this many tokens
MIN_SHARED_PREFIX = 8
#: end-of-turn tokens of common chat templates, used as stop tokens when the template has them
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


@dataclass(frozen=True)
class Generation:
    """One decoded continuation.

    Attributes:
        tokens: generated token ids, without the stop token.
        stopped: ``"stop"`` (a stop token was generated) or ``"length"`` (``max_new_tokens``).
    """

    tokens: list[int]
    stopped: str

    @property
    def truncated(self) -> bool:
        return self.stopped == "length"


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def stop_token_ids(tokenizer, model: nn.Module | None = None) -> tuple[int, ...]:
    """Token ids that end a generation: EOS ids of the generation config and tokenizer, plus
    every end-of-turn token of :data:`END_OF_TURN_TOKENS` that the chat template uses.

    SmolLM2-Instruct gives ``(2,)`` (``<|im_end|>`` is its EOS); Llama-3-Instruct adds
    ``<|eot_id|>`` to ``<|end_of_text|>``.
    """
    ids = set(_as_ids(getattr(tokenizer, "eos_token_id", None)))
    if model is not None and getattr(model, "generation_config", None) is not None:
        ids.update(_as_ids(model.generation_config.eos_token_id))
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    vocab = tokenizer.get_vocab()
    ids.update(vocab[tok] for tok in END_OF_TURN_TOKENS if tok in template and tok in vocab)
    if not ids:
        raise ValueError("the tokenizer has no EOS token and its chat template no known end-of-turn token")
    return tuple(sorted(ids))


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-aligned ``(ids, attention_mask)`` of shape (B, T), T the longest prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)  # (B, T), (B, T)


def common_prefix_length(prompts: list[list[int]]) -> int:
    """Number of leading tokens all prompts share, leaving every prompt at least one of its own."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def _sliding_window_too_short(model: nn.Module, longest_sequence: int) -> bool:
    window = getattr(model.config, "sliding_window", None)
    return bool(window) and window < longest_sequence


@torch.inference_mode()
def shared_prefix(model: nn.Module, prompts: list[list[int]], longest_sequence: int, enabled: bool = True):
    """``(prefix_cache, prefix_len)`` of the prompts' common prefix, or ``(None, 0)`` when not worth it.

    The prefix is run once (batch 1); :func:`prefill_inputs` copies its cache for each batch.
    Not shared for fewer than two prompts, fewer than :data:`MIN_SHARED_PREFIX` common tokens,
    or a sliding window shorter than ``longest_sequence`` (see the module docstring).
    """
    prefix_len = common_prefix_length(prompts) if enabled and len(prompts) > 1 else 0
    if prefix_len < MIN_SHARED_PREFIX or _sliding_window_too_short(model, longest_sequence):
        return None, 0
    ids = torch.tensor([prompts[0][:prefix_len]], device=model_device(model))  # (1, P)
    return lm_forward(model, ids, logits_to_keep=1)[1], prefix_len


def prefill_inputs(prompts: list[list[int]], pad_id: int, device, prefix_cache=None, prefix_len: int = 0):
    """Inputs of a batch's prefill forward: ``(ids, mask, positions, cache)``.

    Without a prefix: ids (B, T) left-padded, mask (B, T), positions (B, T), cache ``None``.
    With one: ids (B, T) are each prompt's own tokens after the prefix, left-padded; mask
    (B, P + T) covers the prefix too; cache is a copy of ``prefix_cache`` repeated B times.
    """
    batch = len(prompts)
    if prefix_cache is None:
        ids, mask = left_pad(prompts, pad_id, device)  # (B, T)
        return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), None
    cache = repeat_cache(prefix_cache, batch)  # (B, ...) copies of the prefix
    ids, own_mask = left_pad([p[prefix_len:] for p in prompts], pad_id, device)  # (B, T)
    mask = torch.cat([own_mask.new_ones((batch, prefix_len)), own_mask], dim=1)  # (B, P + T)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, prefix_len:]  # (B, T)
    return ids, mask, positions, cache


@torch.inference_mode()
def generate_batch(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, stop_ids: tuple[int, ...],
                   pad_id: int, prefix_cache=None, prefix_len: int = 0) -> list[Generation]:
    """Greedy-decode one batch of prompts together (see the module docstring).

    ``prefix_cache`` (from :func:`shared_prefix`) holds the first ``prefix_len`` tokens that
    all ``prompts`` share; it is copied, not changed.
    """
    device = model_device(model)
    ids, mask, positions, cache = prefill_inputs(prompts, pad_id, device, prefix_cache, prefix_len)
    logits, cache = lm_forward(model, ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1)
    next_tokens = logits[:, -1].argmax(-1)  # (B,)
    last_pos = positions[:, -1]  # (B,)
    rows = list(range(len(prompts)))  # batch row -> prompt index
    generated: list[list[int]] = [[] for _ in prompts]
    stopped: list[str | None] = [None] * len(prompts)
    stop = set(stop_ids)
    while True:
        keep = []
        for i, (row, tok) in enumerate(zip(rows, next_tokens.tolist())):
            if tok in stop:
                stopped[row] = "stop"
                continue
            generated[row].append(tok)
            if len(generated[row]) >= max_new_tokens:
                stopped[row] = "length"
            else:
                keep.append(i)
        if not keep:
            break
        if len(keep) < len(rows):  # drop finished rows from the batch and the cache
            index = torch.tensor(keep, device=device)
            select_cache(cache, index)
            mask, next_tokens, last_pos = mask[index], next_tokens[index], last_pos[index]
            rows = [rows[i] for i in keep]
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)  # (b, T + t)
        last_pos = last_pos + 1
        logits, cache = lm_forward(model, next_tokens[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                                   cache=cache)
        next_tokens = logits[:, -1].argmax(-1)  # (b,)
    return [Generation(tokens=g, stopped=s) for g, s in zip(generated, stopped)]


def generate_greedy(model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int, stop_ids: tuple[int, ...],
                    pad_id: int, batch_size: int = 32, share_prefix: bool = True, progress: bool = False,
                    desc: str = "generate") -> list[Generation]:
    """Greedy-decode every prompt; batched results equal unbatched ones (module docstring).

    Args:
        model: a transformers causal LM.
        prompts: token ids of each prompt (already rendered, special tokens included).
        max_new_tokens: the most tokens generated per prompt (>= 1).
        stop_ids: token ids that end a row (:func:`stop_token_ids`).
        pad_id: id used for left padding (never attended to).
        batch_size: prompts decoded together.
        share_prefix: run the prompts' common prefix once (same tokens, less prefill).
        progress: show a tqdm bar in prompts (examples/s) with the generated tokens/s.
        desc: the bar's label.

    Returns:
        One :class:`Generation` per prompt, in the order of ``prompts``.

    Example::

        lm = load_model()
        ids = encode_prompt(lm.tokenizer, "What is 2 + 3?")
        [g] = generate_greedy(lm.model, [ids], max_new_tokens=32,
                              stop_ids=stop_token_ids(lm.tokenizer, lm.model), pad_id=lm.tokenizer.pad_token_id)
        print(lm.tokenizer.decode(g.tokens))
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; must be >= 1")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: memory peaks early
    results: list[Generation | None] = [None] * len(prompts)
    n_tokens, start = 0, time.perf_counter()
    longest = 2 * max(map(len, prompts)) + max_new_tokens  # bound on prefix + padding + prompt + generation
    prefix_cache, prefix_len = shared_prefix(model, prompts, longest, share_prefix)
    with tqdm(total=len(prompts), desc=desc, unit="ex", disable=not progress, dynamic_ncols=True) as bar:
        for lo in range(0, len(order), batch_size):
            chunk = order[lo: lo + batch_size]
            batch = generate_batch(model, [prompts[i] for i in chunk], max_new_tokens, stop_ids, pad_id, prefix_cache,
                                   prefix_len)
            for i, g in zip(chunk, batch):
                results[i] = g
                n_tokens += len(g.tokens)
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{n_tokens / (time.perf_counter() - start):.1f}")
    return results  # type: ignore[return-value]
