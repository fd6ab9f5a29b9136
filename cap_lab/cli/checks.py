"""Checks of command-line values, run before any slow work (model loading, scoring).

Two kinds:

* argparse ``type=`` functions (:func:`int_at_least`, :func:`fraction`, :func:`device`...):
  a bad value makes argparse report the flag, the value and what is allowed;
* path and environment checks that ``run`` calls first (:func:`check_output_file`,
  :func:`check_runs_folder`, :func:`check_data_source`).

Output folders of pruned checkpoints are checked by :func:`cap_lab.saving.check_output_folder`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import torch

from cap_lab.data import NO_DATA_SOURCE_HELP, TASKS, resolve_data_dir
from cap_lab.saving import check_can_create

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _number(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        value = _number(text, int)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small; must be an integer >= {minimum}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = _number(text, float)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not allowed; must be a number > 0")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1) (a sparsity)."""
    value = _number(text, float)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, 1)")
    return value


def count_or_all(text: str) -> int | None:
    """An argparse type: an integer >= 1, or ``all`` (``None``)."""
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an integer >= 1 nor 'all'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too small; must be an integer >= 1 or 'all'")
    return value


def task_list(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated calibration tasks from :data:`cap_lab.data.TASKS`."""
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown or no task(s) {bad}; allowed: {', '.join(TASKS)}")
    return tasks


def available_devices() -> list[str]:
    """The devices torch can use on this machine: ``cpu``, then ``cuda:N`` and ``mps`` if present."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def device(text: str) -> str:
    """An argparse type: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, available on this machine."""
    here = available_devices()
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; allowed: cpu, cuda, cuda:N, mps "
                                         f"(available here: {', '.join(here)})") from None
    name = parsed.type if parsed.index is None else f"{parsed.type}:{parsed.index}"
    if name not in here and name != "cpu:0":
        raise argparse.ArgumentTypeError(f"{text!r} is not available on this machine; available: {', '.join(here)}")
    return text


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def device_map(text: str) -> str | dict:
    """An argparse type: a transformers/accelerate ``device_map``.

    One of :data:`DEVICE_MAP_STRATEGIES`, a device of this machine (:func:`device`), or a JSON
    object from module names to a device of this machine, a GPU index, or ``"disk"``
    (``'{"": 0}'``, ``'{"model": "cuda:0", "lm_head": "cpu"}'``).
    """
    text = text.strip()
    allowed = (f"allowed: {', '.join(DEVICE_MAP_STRATEGIES)}, a device of this machine "
               f"({', '.join(available_devices())}), or a JSON object of module name -> device")
    if text in DEVICE_MAP_STRATEGIES:
        return text
    if not text.startswith("{"):
        try:
            return device(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a device map; {allowed}") from None
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({e.msg}); {allowed}") from None
    if not isinstance(mapping, dict) or not mapping:
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-empty JSON object; {allowed}")
    gpus = torch.cuda.device_count()
    for module, where in mapping.items():
        if isinstance(where, bool) or not isinstance(where, (int, str)):
            raise argparse.ArgumentTypeError(f"module {module!r} maps to {where!r}; {allowed}")
        if isinstance(where, int):
            if not 0 <= where < gpus:
                raise argparse.ArgumentTypeError(f"module {module!r} maps to GPU {where}, but this machine has "
                                                 f"{gpus} GPU(s)")
        elif where != "disk":
            try:
                device(where)
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"module {module!r}: {e}") from None
    return mapping


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """A file path that can be written: not an existing folder, in a writable place."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a folder; it must be a file path, e.g. {str(path / 'scores.json')!r}")
    return check_can_create(path)


def check_runs_folder(path: str | os.PathLike | None, flag: str = "--out") -> Path | None:
    """A folder that results are added to: existing or creatable, not a file, writable."""
    if path is None:
        return None
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file; it must be a folder")
    check_can_create(path / "run")  # probes the folder itself when it exists, else where it will be made
    return path


def datasets_installed() -> bool:
    """Whether the ``datasets`` package (hub access) can be imported."""
    try:
        return importlib.util.find_spec("datasets") is not None
    except (ImportError, ValueError):  # a broken or blocked installation
        return False


def check_data_source(data_dir: str | os.PathLike | None) -> Path | None:
    """The data dir (``--data-dir``, else ``$CAP_LAB_DATA``), or ``None`` when the hub is usable.

    Raises:
        FileNotFoundError: the data dir does not exist.
        ImportError: no data dir, and ``datasets`` is not installed for hub access.
    """
    root = resolve_data_dir(data_dir)
    if root is None and not datasets_installed():
        raise ImportError(NO_DATA_SOURCE_HELP)
    return root
