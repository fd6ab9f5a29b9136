"""Atomic file and folder writes: the one place cap_lab writes a result to disk.

A reader (another process, a later run, a notebook) must see a whole file or folder or none,
never half of one, even when the writer is interrupted (Ctrl-C, a full disk, a killed job).
Everything is written under a temporary name in the destination's own folder (so the final
rename stays on one filesystem, where it is atomic) and renamed into place only once complete;
on any error the temporary is removed and the destination is left as it was.

Example:
    >>> atomic_write_text("runs/scores.json", '{"scores": []}')
    >>> with atomic_folder("runs/checkpoint") as tmp:
    ...     (tmp / "a.txt").write_text("a")      # "runs/checkpoint" appears whole on exit
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    Args:
        path: the destination file (its folder is created if needed).
        write: writes the complete content to the path it is given.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


@contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name; it becomes ``path`` when the block ends without error.

    Args:
        path: the destination folder.
        replace: remove an existing ``path`` just before the rename (else it must not exist).

    Yields:
        The temporary folder to fill.

    Raises:
        FileExistsError: ``path`` exists and ``replace`` is false (checked before and after).
    """
    path = Path(path).expanduser()
    if path.exists() and not replace:
        raise FileExistsError(f"{str(path)!r} exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            if not replace:
                raise FileExistsError(f"{str(path)!r} appeared while it was being written")
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()
