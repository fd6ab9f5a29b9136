"""Saving pruned checkpoints (paper Sec. 3.4, "Weight-level execution").

``save_pruned`` writes safetensors shards of at most 4 GB, the tokenizer and a
``cap_lab.json`` describing how the weights were pruned, into a temporary folder that is
renamed into place (:func:`cap_lab.io.atomic_folder`). The result reloads with plain
``AutoModelForCausalLM.from_pretrained`` and keeps every zero.

Ownership: ``cap_lab.json`` (a JSON object with ``cap_lab_version``, which every version of
``save_pruned`` has written) is the proof that cap_lab wrote a folder. ``overwrite=True``
(``cap-lab prune --overwrite``) replaces only such a folder, or an empty one; it never replaces
a file, a symbolic link, a non-empty folder without that marker, the filesystem root, the home
folder, the current folder or any folder above it. :func:`check_output_folder` holds these
rules; ``save_pruned`` applies it before writing and again just before the rename, and
``cap-lab prune`` calls it before loading the model, so a refused destination costs nothing.

Writability: :func:`check_can_create` creates (and removes) a probe folder where the output
will be created, because permission bits do not tell: root ignores them, and a read-only or
special filesystem (``/proc``, ``/sys``) refuses even root while ``os.access`` says yes. It
catches a destination under a file, a missing permission, a read-only or special filesystem;
it cannot promise that the disk will not fill up while the checkpoint is written (the atomic
write then leaves the destination as it was).
"""
from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from cap_lab import __version__
from cap_lab.io import atomic_folder

MARKER = "cap_lab.json"


def is_cap_lab_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a ``cap_lab.json`` written by :func:`save_pruned` (the ownership marker)."""
    marker = Path(folder).expanduser() / MARKER
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and "cap_lab_version" in info


def check_can_create(path: str | os.PathLike) -> Path:
    """Check that ``path`` (a file or folder, existing or not) can be created or replaced.

    Creates and removes a probe folder in the nearest existing folder above ``path``, where
    the output's temporary copy and any missing parent folders will be created.

    Args:
        path: the destination.

    Returns:
        ``path`` as a :class:`~pathlib.Path` (``~`` expanded).

    Raises:
        ValueError: a file stands where a parent folder of ``path`` is needed.
        PermissionError: nothing can be created there (permissions, read-only filesystem...).
    """
    path = Path(path).expanduser()
    base = path.absolute().parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise ValueError(f"cannot create {str(path)!r}: {str(base)!r} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".cap_lab-write-probe-", dir=base))
    except OSError as e:
        raise PermissionError(f"cannot create {str(path)!r}: creating an entry in {str(base)!r} failed "
                              f"({e.strerror or e}); choose a writable location") from e
    return path


def _protected(path: Path) -> str | None:
    """Why ``path`` may never be replaced, or ``None``."""
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == cwd:
        return "it is the current folder"
    if resolved in cwd.parents:
        return "it is a folder above the current folder"
    if resolved == Path.home().resolve():
        return "it is the home folder"
    if resolved == resolved.parent:
        return "it is the filesystem root"
    return None


def check_output_folder(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check that a checkpoint can be saved to ``path`` (see the module docstring's rules).

    Args:
        path: the destination folder.
        overwrite: whether an existing cap_lab checkpoint (or empty folder) may be replaced.

    Returns:
        ``path`` as a :class:`~pathlib.Path` (``~`` expanded).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false, or it is a file.
        ValueError: ``overwrite`` would replace a folder cap_lab did not write, or a protected one.
        PermissionError: the destination is not writable (see :func:`check_can_create`).
    """
    path = Path(path).expanduser()
    if path.is_symlink():
        raise ValueError(f"output folder {str(path)!r} is a symbolic link; give the folder itself")
    if path.exists():
        why = _protected(path)
        if why:
            raise ValueError(f"refusing to save a checkpoint to {str(path)!r}: {why}; choose a new folder")
        if not path.is_dir():
            raise FileExistsError(f"output {str(path)!r} is an existing file, not a folder; choose a new folder")
        if not overwrite:
            raise FileExistsError(f"output folder {str(path)!r} exists; pass overwrite=True (--overwrite) to replace "
                                  "it (only a checkpoint written by cap_lab is replaced)")
        entries = sorted(p.name for p in path.iterdir())
        if entries and not is_cap_lab_checkpoint(path):
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise ValueError(f"refusing to replace {str(path)!r}: it holds {len(entries)} entries ({shown}) but no "
                             f"{MARKER} from cap_lab, so cap_lab did not write it; overwrite replaces only a "
                             "checkpoint written by cap_lab or an empty folder")
    return check_can_create(path)


def save_pruned(model, tokenizer, path: str | os.PathLike, metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write a pruned model to ``path`` atomically.

    Args:
        model: the pruned model.
        tokenizer: its tokenizer.
        path: destination folder: new, or (with ``overwrite``) a checkpoint cap_lab wrote or
            an empty folder; see :func:`check_output_folder`.
        metadata: method, target and achieved sparsity, score provenance...; stored in
            ``cap_lab.json`` with the package version and the time.
        overwrite: replace an existing checkpoint written by cap_lab.

    Returns:
        The folder.
    """
    path = check_output_folder(path, overwrite)
    with atomic_folder(path, replace=overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size="4GB", safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = dict(metadata or {}, cap_lab_version=__version__,
                    saved=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        (tmp / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
        check_output_folder(path, overwrite)  # again: the destination may have changed while writing
    return path


def read_prune_info(path: str | os.PathLike) -> dict | None:
    """The ``cap_lab.json`` of a pruned checkpoint folder, or ``None`` for other models."""
    f = Path(path).expanduser() / MARKER
    return json.loads(f.read_text()) if f.is_file() else None
