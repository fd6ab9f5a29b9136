"""Settings-keyed on-disk cache, without pickle, written atomically.

An entry is a folder ``<cache_root>/<kind>/<key>/`` holding ``settings.json`` (everything that
determined the result, including the key's payload) and optionally ``tensors.safetensors``.
The key is the SHA-256 of the canonical JSON of the payload. Entries are written to a
temporary folder and renamed into place, so readers see a whole entry or none; an entry that
fails to parse or whose stored payload differs from the asked one is treated as missing (and
recomputed by the caller), never trusted.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from cap_lab.models import cache_root


def cache_key(payload: dict) -> str:
    """SHA-256 (first 20 hex chars) of the canonical JSON of ``payload``."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def entry_dir(kind: str, payload: dict, root: str | os.PathLike | None = None) -> Path:
    return Path(root or cache_root()) / kind / cache_key(payload)


def _canonical(payload: dict) -> dict:
    return json.loads(json.dumps(payload, sort_keys=True, default=str))


def load_entry(kind: str, payload: dict, root=None) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """``(settings, tensors)`` of a valid entry, or ``None`` if absent or corrupt."""
    folder = entry_dir(kind, payload, root)
    if not folder.is_dir():
        return None
    try:
        settings = json.loads((folder / "settings.json").read_text())
        if settings.get("payload") != _canonical(payload):
            raise ValueError("stored settings differ from the requested ones")
        tensors = {}
        if (folder / "tensors.safetensors").exists():
            from safetensors.torch import load_file

            tensors = load_file(str(folder / "tensors.safetensors"))
        return settings, tensors
    except Exception as e:  # corrupt entry: recompute, never trust
        warnings.warn(f"ignoring corrupt cache entry {folder}: {e}")
        return None


def save_entry(kind: str, payload: dict, meta: dict, tensors: dict[str, torch.Tensor] | None = None, root=None) -> Path:
    """Write an entry atomically; returns its folder. ``meta`` is stored beside the payload."""
    folder = entry_dir(kind, payload, root)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        settings = dict(meta, payload=_canonical(payload), key=folder.name)
        (tmp / "settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True, default=str))
        if tensors:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
        if folder.exists():  # replacing a corrupt or forced entry
            shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.exists():
            raise
    return folder
