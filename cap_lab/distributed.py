"""Scoring on several processes with torch.distributed: launch, work split, gathering, failure.

Launch one process per model replica with torchrun; each loads the whole model (one GPU per
rank, or with ``device_map`` several GPUs that it alone sees) and the same calibration set::

    torchrun --nproc-per-node 2 -m cap_lab.cli score --device cuda ...
    torchrun --nproc-per-node 2 --no-python bash -c \\
        'CUDA_VISIBLE_DEVICES=$((2*LOCAL_RANK)),$((2*LOCAL_RANK+1)) exec cap-lab score --device-map auto ...'

:func:`init_from_env` (called before the model is loaded) joins the process group that torchrun
describes in ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``: backend ``nccl`` for CUDA,
``gloo`` on CPU. cap_lab's own messages are small CPU tensors sent over gloo (a gloo side group
when the default backend is NCCL), so :func:`barrier` can be gloo's ``monitored_barrier``.
Without torchrun (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) nothing is initialized, :func:`world`
is ``(0, 1)`` and every helper here does nothing: a single process is the one-rank case.

Who does what (:func:`cap_lab.scoring.head_scores`): rank 0 reads the per-layer progress of the
exact scorer and tells the others which layers are finished; the unfinished layers are split
with :func:`my_share`; every rank writes the progress file of each layer it finishes into the
shared progress folder; the per-layer results are summed across ranks (:func:`sum_across_ranks`;
shares are disjoint, so the sum is exact) and every rank returns the same scores; rank 0 alone
writes the cache entry and removes the progress folder. The ranks must share the cache folder
(one filesystem), or resume cannot find the layers other ranks finished.

Failure: a rank that dies loses the layer it was scoring, nothing finished before. The others
fail at their next collective (gloo notices a closed peer within a second; a hung rank is caught
by the ``timeout`` of :func:`init_from_env`), and torchrun stops the whole job when one rank
exits with an error. Rerunning the same command resumes: only the missing layers are scored.
"""
from __future__ import annotations

import hashlib
import json
import os
from datetime import timedelta
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
DEFAULT_TIMEOUT = timedelta(minutes=30)  # longest wait at a barrier: about one layer of scoring
_control: dict = {}  # "group": gloo group for cap_lab's messages (None: the default), "timeout", "owned"


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialized process group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str | None = None, *, device_map=None, timeout: timedelta = DEFAULT_TIMEOUT) -> str | None:
    """Join the process group torchrun describes in the environment; nothing without torchrun.

    Args:
        device: the device asked for (``cpu``, ``cuda``, or ``None``: CUDA if available).
        device_map: the ``device_map`` the model is loaded with; the replica then spans the
            GPUs this process sees (restrict them per rank with ``CUDA_VISIBLE_DEVICES``).
        timeout: how long a rank waits at a barrier or collective before failing.

    Returns:
        The device to load this rank's replica on: ``cuda:LOCAL_RANK`` for CUDA with one GPU
        per rank, else ``device`` unchanged.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = kind == "cuda" or (device_map is not None and torch.cuda.is_available())
    if cuda and device_map is None:
        if device is not None and torch.device(device).index is not None:
            raise ValueError(f"device={device!r} under torchrun; pass 'cuda': rank r uses cuda:LOCAL_RANK")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    _control.update(group=dist.new_group(backend="gloo", timeout=timeout) if cuda else None, timeout=timeout,
                    owned=True)
    return device


def close() -> None:
    """Leave the process group that :func:`init_from_env` joined (at the end of a torchrun command).

    A group the caller initialized itself is left as it is: it is the caller's to destroy.
    """
    if _control.get("owned") and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control.clear()


def _group():
    if "group" not in _control:  # initialized elsewhere: make the gloo group once (all ranks get here)
        gloo = dist.get_backend() == "gloo"
        _control.update(group=None if gloo else dist.new_group(backend="gloo"), timeout=DEFAULT_TIMEOUT)
    return _control["group"]


def my_share(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's items, dealt in snake order (0, 1, .., W-1, W-1, .., 0, 0, 1, ..).

    For layers in order the snake balances the exact scorer's cost (layer l runs L - l
    layers per head) better than round-robin, which gives rank 0 the dearest of every round.

    Example:
        >>> my_share(range(6), 0, 2), my_share(range(6), 1, 2)
        ([0, 3, 4], [1, 2, 5])
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}; must be in [0, {world_size})")
    return [x for i, x in enumerate(items)
            if (i % world_size if (i // world_size) % 2 == 0 else world_size - 1 - i % world_size) == rank]


def barrier() -> None:
    """Wait for every rank; raises naming the ranks that failed or did not come within the timeout."""
    if world()[1] > 1:
        dist.monitored_barrier(_group(), timeout=_control["timeout"], wait_all_ranks=True)


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks, in place (on CPU, over gloo); every rank gets the sum."""
    if world()[1] > 1:
        cpu = tensor.cpu()
        dist.all_reduce(cpu, group=_group())
        tensor.copy_(cpu)
    return tensor


def broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's values of a CPU tensor, in place on every rank."""
    if world()[1] > 1:
        dist.broadcast(tensor, src=0, group=_group())
    return tensor


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank."""
    return bool(sum_across_ranks(torch.tensor([0.0 if flag else 1.0]))[0] == 0)


def check_same_on_all_ranks(what: str, value) -> None:
    """Raise ``ValueError`` unless every rank has the same JSON-able ``value`` (e.g. a cache key)."""
    rank, size = world()
    if size == 1:
        return
    digest = int(hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:15], 16)
    mine = torch.zeros(size, dtype=torch.int64)
    mine[rank] = digest
    digests = sum_across_ranks(mine).tolist()
    if len(set(digests)) > 1:
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        raise ValueError(f"ranks {odd} have a different {what} than rank 0; every rank must load the same model "
                         "and build the same calibration set")
