"""A settings-keyed, checksummed store of results: the score cache, saved evaluation runs, sweep cells.

An entry is a folder ``<root>/<prefix><key>`` where ``key`` is the first 20 hex characters of
the SHA-256 of the canonical JSON (sorted keys, ``default=str``) of ``{"payload": payload,
"store_format": FORMAT_VERSION}``. The payload is everything that changes the result (model
name and weight fingerprint, calibration token ids, settings, the caller's own version), so a
changed input is a new entry, never a stale hit.

The folder holds ``entry.json`` (the manifest: format version, key, the canonical payload, the
caller's metadata, and the size and SHA-256 of every other file in the entry, all under a
SHA-256 of the manifest's own content), an optional ``tensors.safetensors`` and any named
text files. :func:`save` writes the folder with :func:`cap_lab.io.atomic_folder`, so a reader
sees a whole entry or none. :func:`load` trusts nothing it has not checked: a missing or
unreadable manifest, a different payload, a missing, truncated or altered file, or tensors
that fail the caller's check (names, shapes, finite values) make it warn in one line and return
``None``, so the caller recomputes and its next :func:`save` replaces the damaged entry.

Example:
    >>> folder = save(root, {"model": "m", "n": 3}, {"note": "x"}, tensors={"losses": torch.zeros(3)})  # doctest: +SKIP
    >>> load(root, {"model": "m", "n": 3}, shapes={"losses": (3,)}).tensors["losses"]  # doctest: +SKIP
    tensor([0., 0., 0.])
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from cap_lab.io import atomic_folder, sha256_file

#: bump when the entry layout changes (part of every key, so old entries are never read)
FORMAT_VERSION = "1"
MANIFEST = "entry.json"
TENSORS = "tensors.safetensors"


@dataclass(frozen=True)
class Entry:
    """A checked entry.

    Attributes:
        folder: the entry folder (its named files are read from here).
        payload: the canonical payload (JSON types only).
        metadata: the caller's metadata as saved (JSON types only).
        tensors: the saved tensors (empty if none were saved).
    """

    folder: Path
    payload: dict
    metadata: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _canonical(obj) -> object:
    return json.loads(json.dumps(obj, default=str))


def _dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def entry_key(payload: dict) -> str:
    """First 20 hex chars of the SHA-256 of the canonical payload and :data:`FORMAT_VERSION`."""
    blob = _dumps({"payload": _canonical(payload), "store_format": FORMAT_VERSION})
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def entry_folder(root: str | os.PathLike, payload: dict, prefix: str = "") -> Path:
    """``<root>/<prefix><key>``: where the entry of ``payload`` lives (it may not exist)."""
    return Path(root).expanduser() / f"{prefix}{entry_key(payload)}"


def file_records(folder: str | os.PathLike, names) -> dict[str, dict]:
    """``{name: {"size", "sha256"}}`` of the files ``names`` in ``folder``."""
    folder = Path(folder)
    return {n: {"size": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in sorted(names)}


def check_files(folder: str | os.PathLike, records: Mapping[str, dict]) -> str | None:
    """What is wrong with the files of ``folder`` against ``records``, or ``None`` if nothing.

    Sizes are compared first (cheap; catches truncation), then SHA-256 (any altered byte).
    """
    folder = Path(folder)
    for name, rec in sorted(records.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != rec["size"]:
            return f"{name} has {path.stat().st_size} bytes, expected {rec['size']}"
        if sha256_file(path) != rec["sha256"]:
            return f"checksum of {name} differs"
    return None


def check_tensors(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...] | None]) -> None:
    """Raise ``ValueError`` unless ``tensors`` has exactly the names of ``shapes``, those shapes
    (``None``: any shape) and only finite values."""
    if set(tensors) != set(shapes):
        raise ValueError(f"tensors {sorted(tensors)}, expected {sorted(shapes)}")
    for name, shape in shapes.items():
        t = tensors[name]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {name!r} has NaN or infinite values")


def _manifest_digest(manifest: dict) -> str:
    return hashlib.sha256(_dumps({k: v for k, v in manifest.items() if k != "sha256"}).encode()).hexdigest()


def _read(folder: Path, payload: dict, shapes, validate) -> Entry:
    """The entry in ``folder``; raises ``ValueError`` (or ``OSError``) saying what is wrong."""
    if not (folder / MANIFEST).is_file():
        raise ValueError(f"{MANIFEST} is missing")
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{MANIFEST} is not JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("sha256") != _manifest_digest(manifest):
        raise ValueError(f"checksum of {MANIFEST} differs")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(f"format version {manifest['format_version']!r}, expected {FORMAT_VERSION!r}")
    if _dumps(manifest["payload"]) != _dumps(_canonical(payload)):
        raise ValueError("its payload differs from the requested one")
    problem = check_files(folder, manifest["files"])
    if problem:
        raise ValueError(problem)
    tensors = {}
    if TENSORS in manifest["files"]:
        from safetensors.torch import load_file

        tensors = load_file(str(folder / TENSORS))
    entry = Entry(folder, manifest["payload"], manifest["metadata"], tensors)
    if shapes is not None:
        check_tensors(tensors, shapes)
    if validate is not None:
        validate(entry)
    return entry


def load(root: str | os.PathLike, payload: dict, *, prefix: str = "",
         shapes: Mapping[str, tuple[int, ...] | None] | None = None,
         validate: Callable[[Entry], None] | None = None) -> Entry | None:
    """The checked entry of ``payload``, or ``None`` when it is absent or damaged.

    A damaged entry (see the module docstring) is reported with one ``UserWarning`` line naming
    its folder and what is wrong; an absent one silently.

    Args:
        root: the folder holding the entries.
        payload: everything that determined the result (JSON-serialisable; see :func:`entry_key`).
        prefix: the start of the entry folder's name (e.g. ``"gsm8k-cot-"``).
        shapes: if given, the tensors must have exactly these names, these shapes (``None``:
            any) and finite values (:func:`check_tensors`).
        validate: called with the entry; raises ``ValueError`` with a reason to reject it.

    Returns:
        The :class:`Entry`, or ``None``.
    """
    folder = entry_folder(root, payload, prefix)
    if not folder.exists():
        return None
    try:
        return _read(folder, payload, shapes, validate)
    except Exception as e:  # damaged in any way: report, and let the caller recompute
        reason = str(e) if type(e) is ValueError else f"{type(e).__name__}: {e}"
        reason = " ".join(reason.split())
        warnings.warn(f"cap_lab: ignoring corrupt cache entry {folder}: {reason}; recomputing", stacklevel=2)
        return None


def save(root: str | os.PathLike, payload: dict, metadata: dict | None = None, *, prefix: str = "",
         tensors: Mapping[str, torch.Tensor] | None = None, files: Mapping[str, str] | None = None) -> Path:
    """Write the entry of ``payload`` atomically, replacing any entry already there.

    Args:
        root: the folder holding the entries.
        payload: everything that determined the result (its key).
        metadata: anything else to keep with it (JSON-serialisable; ``default=str``).
        prefix: the start of the entry folder's name.
        tensors: tensors to store in ``tensors.safetensors`` (moved to CPU).
        files: ``{file name: text}`` written as UTF-8 files in the entry.

    Returns:
        The entry folder.
    """
    files = dict(files or {})
    if {MANIFEST, TENSORS} & set(files) or any(Path(n).name != n for n in files):
        raise ValueError(f"file names {sorted(files)}: plain names other than {MANIFEST!r} and {TENSORS!r} only")
    folder = entry_folder(root, payload, prefix)
    try:
        with atomic_folder(folder, replace=True) as tmp:
            for name, text in files.items():
                (tmp / name).write_text(text, encoding="utf-8")
            if tensors:
                from safetensors.torch import save_file

                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
            names = list(files) + ([TENSORS] if tensors else [])
            manifest = {"format_version": FORMAT_VERSION, "key": entry_key(payload), "payload": _canonical(payload),
                        "metadata": _canonical(metadata or {}), "files": file_records(tmp, names)}
            manifest["sha256"] = _manifest_digest(manifest)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    except OSError as e:  # a concurrent save of the same entry renamed its folder in first: keep that one
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not (folder / MANIFEST).is_file():
            raise
    return folder
