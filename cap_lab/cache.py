"""Deprecated: the score cache's old entry points, now thin wrappers over :mod:`cap_lab.store`.

``<cache_root>/<kind>/<key>/`` entries are :mod:`cap_lab.store` entries (checksummed manifest,
optional ``tensors.safetensors``); stored tensors must be finite. Kept only until
:mod:`cap_lab.scoring` calls the store directly; new code uses :mod:`cap_lab.store`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from cap_lab import store
from cap_lab.models import cache_root

cache_key = store.entry_key


def _root(kind: str, root) -> Path:
    return Path(root or cache_root()) / kind


def entry_dir(kind: str, payload: dict, root: str | os.PathLike | None = None) -> Path:
    """Folder of the entry of ``payload`` (it may not exist)."""
    return store.entry_folder(_root(kind, root), payload)


def _finite(entry: store.Entry) -> None:
    store.check_tensors(entry.tensors, dict.fromkeys(entry.tensors))


def load_entry(kind: str, payload: dict, root=None) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """``(settings, tensors)`` of a checked entry, or ``None`` if absent or damaged (one warning)."""
    entry = store.load(_root(kind, root), payload, validate=_finite)
    if entry is None:
        return None
    return dict(entry.metadata, payload=entry.payload, key=entry.folder.name, path=str(entry.folder)), entry.tensors


def save_entry(kind: str, payload: dict, meta: dict, tensors: dict[str, torch.Tensor] | None = None, root=None) -> Path:
    """Write an entry atomically; returns its folder. ``meta`` is stored beside the payload."""
    return store.save(_root(kind, root), payload, meta, tensors=tensors)
