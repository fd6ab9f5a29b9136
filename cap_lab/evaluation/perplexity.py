"""WikiText-2 perplexity, the protocol of Wanda and SparseGPT (paper Sec. 3.4, Table 1).

1. The raw test split joined with ``"\\n\\n"`` (:func:`cap_lab.data.load_wikitext2_test`) is
   tokenized once, with the tokenizer's default special tokens (as those scripts do;
   :func:`cap_lab.data.tokenize_corpus`).
2. The ids are cut into non-overlapping windows of ``seqlen`` tokens (default 2048, capped by
   the model's context); the incomplete tail is dropped; the first ``n_windows`` are kept
   (the paper: 100 windows, about 204k tokens).
3. Each window is scored on its own: every token but the first is predicted from the tokens
   before it in the window, so a window gives ``seqlen - 1`` predictions.
4. perplexity = exp(mean token cross-entropy over all predictions). With equal windows this is
   exactly Wanda's ``exp(sum(window_mean_loss * seqlen) / (n_windows * seqlen))``.

Memory: one window at a time through the base model, then the LM head on ``chunk_size``
positions at a time (:mod:`cap_lab.modeling.head`), so full-vocabulary logits never
exist for more than one chunk of one window. The 95% interval is exp of a normal interval of
the mean loss over windows (windows are the independent units), reported beside the number.
"""
from __future__ import annotations

import hashlib
import math
import statistics
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from cap_lab.data import load_wikitext2_test, tokenize_corpus
from cap_lab.modeling import decoder_forward, get_layout, model_device, token_logprobs
from cap_lab.evaluation.results import EVAL_VERSION, EvalResult, cached_run, describe_model
from cap_lab.evaluation.settings import EvalSettings

PERPLEXITY_TASK = "wikitext2"


def token_windows(ids: torch.Tensor, seqlen: int, n_windows: int | None = None) -> torch.Tensor:
    """Cut a 1-D id tensor into non-overlapping windows, dropping the incomplete tail.

    Args:
        ids: (N,) token ids.
        seqlen: tokens per window.
        n_windows: keep the first this many windows (``None``: all complete windows).

    Returns:
        (n, seqlen) with ``n = min(n_windows, N // seqlen)``.

    Raises:
        ValueError: ``seqlen`` or ``n_windows`` below 1 (or 2 for ``seqlen``), or no complete window.
    """
    if seqlen < 2:
        raise ValueError(f"seqlen={seqlen}; must be >= 2 (a window needs a token to predict)")
    if n_windows is not None and n_windows < 1:
        raise ValueError(f"n_windows={n_windows}; must be >= 1 or None")
    available = ids.numel() // seqlen
    if available == 0:
        raise ValueError(f"{ids.numel()} tokens hold no complete window of seqlen={seqlen}")
    n = available if n_windows is None else min(n_windows, available)
    return ids[: n * seqlen].view(n, seqlen)


@torch.inference_mode()
def window_nll(model: nn.Module, windows: torch.Tensor, chunk_size: int = 512, progress: bool = False) -> torch.Tensor:
    """Summed next-token cross-entropy of each window, shape (n,), for windows of shape (n, S)."""
    device, layout = model_device(model), get_layout(model)
    sums = torch.empty(windows.shape[0], dtype=torch.float64)
    for i in tqdm(range(windows.shape[0]), desc="perplexity", unit="win", disable=not progress, dynamic_ncols=True):
        ids = windows[i: i + 1].to(device)  # (1, S)
        hidden = decoder_forward(model, layout, ids)[0][0, :-1]  # (S-1, d): position t predicts t+1
        sums[i] = -token_logprobs(model, layout, hidden, ids[0, 1:], chunk_size).double().sum().cpu()
    return sums


def perplexity_from_nll(window_sums: torch.Tensor, predictions_per_window: int) -> tuple[float, float | None, float | None]:
    """``(perplexity, ci_low, ci_high)`` from summed window losses (interval needs 2+ windows)."""
    means = (window_sums / predictions_per_window).tolist()
    mean = statistics.fmean(means)
    if len(means) < 2:
        return math.exp(mean), None, None
    half = 1.96 * statistics.stdev(means) / math.sqrt(len(means))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def context_length(model: nn.Module) -> int | None:
    """The model's maximum context from its config, if it states one."""
    return getattr(model.config, "max_position_embeddings", None)


def wikitext2_perplexity(lm, settings: EvalSettings = EvalSettings(), *, data_dir=None, out_dir=None,
                         force: bool = False, chunk_size: int = 512, progress: bool = True,
                         model_info: dict | None = None) -> EvalResult:
    """WikiText-2 test perplexity of a loaded model (see the module docstring).

    Args:
        lm: a :class:`cap_lab.models.LoadedModel`.
        settings: ``ppl_seqlen`` (tokens per window, capped by the model's context length)
            and ``ppl_windows`` (paper: 100; ``None`` uses every complete window) apply.
        data_dir: data folder (default ``$CAP_LAB_DATA``, else the hub).
        out_dir: where the summary and per-window records go (default: the cap_lab cache).
        force: recompute even when a saved result with the same settings exists.
        chunk_size: positions per LM-head chunk.
        progress: show a progress bar.
        model_info: :func:`describe_model` output, when the caller already has it.

    Returns:
        An :class:`EvalResult` with ``metric="perplexity"``; ``details`` holds ``seqlen``,
        ``n_windows``, ``n_tokens`` (tokens in the windows) and ``n_predictions``.
    """
    info = model_info or describe_model(lm)
    seqlen, context = settings.ppl_seqlen, context_length(lm.model)
    used_seqlen = min(seqlen, context) if context else seqlen
    ids = tokenize_corpus(lm.tokenizer, load_wikitext2_test(data_dir))
    windows = token_windows(ids, used_seqlen, settings.ppl_windows)
    payload = {
        "eval_version": EVAL_VERSION, "task": PERPLEXITY_TASK, "mode": "perplexity", "model": info["identity"],
        "dtype": info["dtype"], "device_type": info["device_type"], "seqlen": used_seqlen,
        "n_windows": int(windows.shape[0]),
        "tokens_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16],
    }

    def compute() -> tuple[EvalResult, list[dict]]:
        start = time.perf_counter()
        sums = window_nll(lm.model, windows, chunk_size=chunk_size, progress=progress)
        value, low, high = perplexity_from_nll(sums, used_seqlen - 1)
        records = [{"window": i, "first_token": i * used_seqlen, "nll_sum": float(s),
                    "mean_nll": float(s) / (used_seqlen - 1)} for i, s in enumerate(sums.tolist())]
        details = {"seqlen": used_seqlen, "requested_seqlen": seqlen, "n_windows": int(windows.shape[0]),
                   "available_windows": ids.numel() // used_seqlen, "n_tokens": int(windows.numel()),
                   "n_predictions": int(windows.shape[0] * (used_seqlen - 1)), "corpus_tokens": int(ids.numel()),
                   "mean_nll": float(sums.sum()) / (windows.shape[0] * (used_seqlen - 1)),
                   "seconds": time.perf_counter() - start}
        result = EvalResult(task=PERPLEXITY_TASK, mode="perplexity", metric="perplexity", value=value, ci_low=low,
                            ci_high=high, n=int(windows.shape[0]), settings=payload, model=info["identity"],
                            sparsity=info["sparsity"], details=details)
        return result, records

    return cached_run(payload, out_dir, force, compute)
