"""The scores JSON that ``cap-lab score`` writes and ``cap-lab prune --scores`` reads.

Format (``format_version`` 2)::

    {"format": "cap_lab.head_scores", "format_version": 2,
     "model": {"name": ..., "fingerprint": ..., "dtype": "float32"},   # the scored weights
     "method": "exact", "aggregate": "median",
     "calibration": {...CalibrationConfig.to_dict()...}, "prompt_style": "plain", "tokens_sha256": ...,
     "scores": [[...], ...],                 # (L, H) causal scores, Eq. 2
     "intact_losses": [...], "masked_losses": [[[...]]],                  # (K,), (K, L, H)
     "settings": {...HeadScores.settings...}}

Version 1 files (before this module) have ``"model": "<name>"`` and the identity only in
``settings.payload.model`` (absent when scored with ``--no-cache``); they are still read.
A file needs only ``scores``; without a model identity its origin cannot be checked.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "cap_lab.head_scores"
FORMAT_VERSION = 2


def model_dtype(model) -> str:
    """``float32``, ``bfloat16``... of the model's first parameter."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def scores_to_json(result, lm, calib) -> dict:
    """The scores JSON (see the module docstring) of a :class:`cap_lab.scoring.HeadScores`."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "model": dict(lm.identity(), dtype=model_dtype(lm.model)),
            "method": result.settings.get("method"), "aggregate": result.aggregate,
            "calibration": calib.config.to_dict(), "prompt_style": calib.style, "tokens_sha256": calib.token_digest(),
            "scores": result.scores.tolist(), "intact_losses": result.intact_losses.tolist(),
            "masked_losses": result.masked_losses.tolist(), "settings": result.settings}


def score_provenance(result, calib) -> dict:
    """What produced in-process scores, in the keys :attr:`ScoresFile.provenance` uses."""
    return {"file": None, "method": result.settings.get("method"), "aggregate": result.aggregate,
            "calibration": calib.config.to_dict(), "prompt_style": calib.style,
            "tokens_sha256": calib.token_digest(), "cache_key": result.settings.get("key")}


@dataclass(frozen=True)
class ScoresFile:
    """A scores JSON, checked.

    Attributes:
        path: the file.
        scores: (L, H) finite causal scores.
        model: ``{"name", "fingerprint"[, "dtype"]}`` of the scored model, or ``None`` if unrecorded.
        provenance: file, method, aggregate, calibration, prompt style, token digest, cache key
            (``None`` where the file does not say).
    """

    path: Path
    scores: torch.Tensor
    model: dict | None
    provenance: dict = field(default_factory=dict)


def _scores_matrix(value, where: str) -> torch.Tensor:
    """(L, H) tensor from a JSON list of lists of finite numbers."""
    def is_number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if not (isinstance(value, list) and value and all(isinstance(r, list) and r for r in value)):
        raise ValueError(f"{where}: 'scores' must be a non-empty (layers x heads) list of lists of numbers; "
                         f"got {type(value).__name__} {str(value)[:60]}")
    widths = sorted({len(r) for r in value})
    if len(widths) > 1:
        raise ValueError(f"{where}: 'scores' rows have different lengths {widths}; expected one length (heads per layer)")
    bad_type = [(l, h, x) for l, r in enumerate(value) for h, x in enumerate(r) if not is_number(x)]
    if bad_type:
        l, h, x = bad_type[0]
        raise ValueError(f"{where}: 'scores' holds {len(bad_type)} value(s) that are not numbers (L{l}H{h}={x!r})")
    bad = [(l, h, x) for l, r in enumerate(value) for h, x in enumerate(r) if not math.isfinite(x)]
    if bad:
        shown = ", ".join(f"L{l}H{h}={x}" for l, h, x in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise ValueError(f"{where}: 'scores' holds {len(bad)} NaN or infinite value(s) ({shown}); every score must "
                         "be finite: score the model again")
    return torch.tensor(value, dtype=torch.float32)


def read_scores_json(path: str | os.PathLike, flag: str = "--scores") -> ScoresFile:
    """Read and check a scores JSON (any version; see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a file, not JSON, no ``scores`` key, or scores that are not a finite
            (layers x heads) matrix; the message names the file.
    """
    path = Path(path).expanduser()
    where = f"{flag} {str(path)!r}"
    if not path.exists():
        raise FileNotFoundError(f"{where} does not exist")
    if not path.is_file():
        raise ValueError(f"{where} is not a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not a text (UTF-8) file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where} holds a JSON {type(data).__name__}; expected an object with a 'scores' key, "
                         "as written by `cap-lab score`")
    if "scores" not in data:
        keys = ", ".join(sorted(map(str, data))[:8]) or "none"
        raise ValueError(f"{where} has no 'scores' key (keys: {keys}); expected a file written by `cap-lab score`")
    scores = _scores_matrix(data["scores"], where)
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    payload = settings.get("payload") if isinstance(settings.get("payload"), dict) else {}
    model = data.get("model") if isinstance(data.get("model"), dict) else payload.get("model")
    if not (isinstance(model, dict) and model.get("fingerprint")):
        model = None
    provenance = {"file": str(path.resolve()), "method": data.get("method") or settings.get("method"),
                  "aggregate": data.get("aggregate"), "calibration": data.get("calibration") or payload.get("calibration"),
                  "prompt_style": data.get("prompt_style") or payload.get("style"),
                  "tokens_sha256": data.get("tokens_sha256") or payload.get("tokens_sha256"),
                  "cache_key": settings.get("key")}
    return ScoresFile(path, scores, model, provenance)


def head_grid(model) -> tuple[int, int] | None:
    """(layers, attention heads) from a transformers model's config, or ``None`` if it does not say."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers, heads = getattr(config, "num_hidden_layers", None), getattr(config, "num_attention_heads", None)
    return (layers, heads) if isinstance(layers, int) and isinstance(heads, int) else None


def check_scores_fit(scores_file: ScoresFile, lm) -> None:
    """Refuse scores of another model: a different fingerprint, or a different (layers, heads) grid.

    Raises:
        ValueError: naming the file, both fingerprints (and dtypes) or both shapes.
    """
    where = f"--scores {str(scores_file.path)!r}"
    if scores_file.model is not None and scores_file.model["fingerprint"] != lm.fingerprint:
        theirs, ours = scores_file.model, dict(lm.identity(), dtype=model_dtype(lm.model))
        hint = ""
        if theirs.get("dtype") and theirs["dtype"] != ours["dtype"]:
            hint = f"; the scores were computed in {theirs['dtype']}: try --dtype {theirs['dtype']}"
        raise ValueError(
            f"{where} were computed on model {theirs.get('name')!r} with fingerprint {theirs['fingerprint']}"
            f"{' (' + theirs['dtype'] + ')' if theirs.get('dtype') else ''}, but the loaded model {ours['name']!r} has "
            f"fingerprint {ours['fingerprint']} ({ours['dtype']}); score this model with `cap-lab score`{hint}")
    grid = head_grid(lm.model)
    if grid is not None and tuple(scores_file.scores.shape) != grid:
        raise ValueError(f"{where} holds {tuple(scores_file.scores.shape)} scores (layers, heads), but model "
                         f"{lm.name!r} has {grid}: they were computed on another model")
