"""Saving pruned checkpoints (paper Sec. 3.4, "Weight-level execution").

``save_pruned`` writes safetensors shards of at most 4 GB, the tokenizer and a
``cap_lab.json`` describing how the weights were pruned, into a temporary folder that is
renamed into place. The result reloads with plain ``AutoModelForCausalLM.from_pretrained``
and keeps every zero.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from cap_lab import __version__


def save_pruned(model, tokenizer, path: str | os.PathLike, metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write a pruned model to ``path`` atomically.

    Args:
        model: the pruned model.
        tokenizer: its tokenizer.
        path: destination folder (must not exist unless ``overwrite``).
        metadata: method, target and achieved sparsity, score cache key...; stored in
            ``cap_lab.json`` with the package version and the time.
        overwrite: replace an existing folder.

    Returns:
        The folder.
    """
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise FileExistsError(f"output folder {str(path)!r} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        model.save_pretrained(tmp, max_shard_size="4GB", safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = dict(metadata or {}, cap_lab_version=__version__,
                    saved=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        (tmp / "cap_lab.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_prune_info(path: str | os.PathLike) -> dict | None:
    """The ``cap_lab.json`` of a pruned checkpoint folder, or ``None`` for other models."""
    f = Path(path).expanduser() / "cap_lab.json"
    return json.loads(f.read_text()) if f.is_file() else None
