"""Fast exact causal head scores (paper Sec. 3.2, Eq. 1-2), resumable per layer.

Computes what :func:`cap_lab.scoring.reference.score_heads_reference` computes (one masked pass over the
calibration set per head) without doing its redundant work:

* **Prefix reuse.** Masking head (l, h) leaves layers 0..l-1 unchanged. One intact forward per
  chunk of calibration items captures the hidden states entering layer 0 and the arguments the
  model gives each decoder layer (:mod:`cap_lab.modeling.replay`); heads of layer l then run only
  layers l..L-1, and the hidden states are advanced to layer l+1 by one intact call of layer l.
  Only one layer's hidden states per chunk are kept (tokens x hidden floats in all).
* **Head batching.** Heads of one layer are scored together: the chunk is stacked n times and
  block k of rows masks head k (per-row masks of :func:`cap_lab.modeling.mask_heads`). n is the
  largest that keeps one pass's activations within ``memory_budget`` bytes
  (:func:`heads_per_pass`).
* **Target-only logits.** Final norm and ``lm_head`` run at target positions only.
* **Little padding.** Items are sorted by length and grouped into chunks whose padding stays
  below ``max_padding`` of their real tokens; the intact loss comes from the capture pass.

Per-layer progress (the per-item loss sums of every head of each finished layer) is written to
``checkpoint_dir`` atomically (:mod:`cap_lab.io`; safetensors + JSON, no pickle); a run that stops
midway resumes with identical results, scoring only the layers that are not on disk.

**Several processes** (:mod:`cap_lab.distributed`, launched with torchrun): every rank captures
every chunk and advances its hidden states through the layers, but masks heads only of its share
of the unfinished layers (:func:`cap_lab.distributed.my_share`); the (L, H, N) loss sums are then
summed across ranks (disjoint shares: exact), so every rank returns the single-process result.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from cap_lab import distributed
from cap_lab.calibration import Batch, CalibrationSet, make_batch
from cap_lab.io import atomic_write, atomic_write_text
from cap_lab.modeling import (
    ModelLayout, TargetTokens, call_layer, capture, get_layout, mask_heads, model_device, run_layers, target_loss_sums,
)
from cap_lab.scoring.types import HeadScores, aggregate_scores, check_aggregate, subset_mean_losses

CPU_MEMORY_BUDGET = 1 << 30  # bytes of activations per masked pass on CPU
CUDA_MEMORY_FRACTION = 0.5  # of the free device memory


# ------------------------------------------------------------------ planning (pure)
def plan_chunks(lengths: list[int], batch_size: int, max_padding: float = 0.02) -> list[list[int]]:
    """Group item indices, sorted by length, into chunks of at most ``batch_size`` items.

    A chunk grows while its padded size stays within ``(1 + max_padding)`` of its real tokens.

    Example:
        >>> plan_chunks([5, 9, 5, 10], batch_size=8, max_padding=0.1)
        [[0, 2], [1, 3]]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; must be >= 1")
    if max_padding < 0:
        raise ValueError(f"max_padding={max_padding}; must be >= 0")
    chunks: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        chunk = chunks[-1] if chunks else None
        if chunk and len(chunk) < batch_size:
            real = sum(lengths[j] for j in chunk) + lengths[i]
            if lengths[i] * (len(chunk) + 1) <= (1 + max_padding) * real:  # i is the longest so far
                chunk.append(i)
                continue
        chunks.append([i])
    return chunks


def activation_bytes_per_token(model: nn.Module, layout: ModelLayout, width: int) -> int:
    """A generous estimate of the activation bytes one token row holds inside a decoder layer."""
    cfg = model.config
    d = int(cfg.hidden_size)
    inter = int(getattr(cfg, "intermediate_size", 4 * d) or 4 * d)
    qkv = (layout.num_heads + 2 * layout.num_kv_heads) * layout.head_dim
    floats = 8 * d + 3 * inter + 2 * qkv + layout.num_heads * layout.head_dim + 2 * layout.num_heads * width
    return floats * layout.o_proj(model, 0).weight.element_size()


def default_memory_budget(device: torch.device) -> int:
    """Bytes of activations one masked pass may use: 1 GiB on CPU, half the free memory on CUDA."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_MEMORY_FRACTION)
    return CPU_MEMORY_BUDGET


def heads_per_pass(rows: int, width: int, bytes_per_token: int, num_heads: int, memory_budget: int) -> int:
    """How many heads one pass over a (rows, width) chunk may stack within ``memory_budget``."""
    return max(1, min(num_heads, memory_budget // max(1, rows * width * bytes_per_token)))


def head_groups(num_heads: int, per_pass: int) -> list[list[int]]:
    """Split heads 0..H-1 into near-equal consecutive groups of at most ``per_pass``."""
    n_groups = -(-num_heads // per_pass)
    bounds = [round(g * num_heads / n_groups) for g in range(n_groups + 1)]
    return [list(range(bounds[g], bounds[g + 1])) for g in range(n_groups)]


# ------------------------------------------------------------------ progress on disk
class LayerCheckpoints:
    """Finished layers of one scoring run, one safetensors file per layer, written atomically.

    ``progress.json`` holds a signature of the run (model geometry, items); a folder whose
    signature differs is cleared rather than trusted.
    """

    def __init__(self, folder: str | os.PathLike, signature: dict):
        self.folder = Path(folder)
        self.signature = json.loads(json.dumps(signature, sort_keys=True))

    def _file(self, layer: int) -> Path:
        return self.folder / f"layer_{layer:04d}.safetensors"

    def finished(self) -> dict[int, torch.Tensor]:
        """``{layer: (H, N) float64 loss sums}`` of every finished layer (any subset of layers).

        A folder of another run is cleared; a damaged or misshapen layer file is skipped (and
        recomputed by the caller).
        """
        from safetensors.torch import load_file

        try:
            stored = json.loads((self.folder / "progress.json").read_text())
        except (OSError, ValueError):
            return {}
        if stored != self.signature:
            self.clear()
            return {}
        shape = (self.signature.get("num_heads"), self.signature.get("n_items"))
        out = {}
        for path in sorted(self.folder.glob("layer_[0-9][0-9][0-9][0-9].safetensors")):
            layer = int(path.stem.removeprefix("layer_"))
            try:
                sums = load_file(str(path))["loss_sums"]
            except Exception:  # damaged: recompute that layer
                continue
            if layer < self.signature.get("num_layers", layer + 1) and (None in shape or tuple(sums.shape) == shape):
                out[layer] = sums
        return out

    def save(self, layer: int, loss_sums: torch.Tensor) -> None:
        """Record layer ``layer``'s (H, N) loss sums."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / "progress.json").exists():
            atomic_write_text(self.folder / "progress.json", json.dumps(self.signature))
        atomic_write(self._file(layer), lambda p: save_file({"loss_sums": loss_sums.contiguous()}, str(p)))

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def run_signature(calib: CalibrationSet, layout: ModelLayout) -> dict:
    """What per-layer progress must match: geometry and the exact token ids of every item."""
    return {"method": "exact", "num_layers": layout.num_layers, "num_heads": layout.num_heads,
            "n_items": len(calib.items), "items_sha256": calib.token_digest()}


# ------------------------------------------------------------------ scoring
@dataclass
class ChunkState:
    """One chunk of calibration items while its layers are being scored.

    Attributes:
        batch: the right-padded batch (B rows).
        targets: where its targets are predicted.
        hidden: (B, S, d) hidden states entering the layer being scored.
        layer_kwargs: per layer, the arguments the model gave that layer for this batch.
        heads_per_pass: how many heads one stacked pass holds.
    """

    batch: Batch
    targets: TargetTokens
    hidden: torch.Tensor
    layer_kwargs: list[dict]
    heads_per_pass: int


def masked_loss_sums(model: nn.Module, layout: ModelLayout, layer: int, state: ChunkState, heads: list[int],
                     max_logit_rows: int) -> torch.Tensor:
    """(len(heads), B) target loss sums with each of ``heads`` of ``layer`` masked in turn."""
    n, rows = len(heads), state.batch.input_ids.shape[0]
    mask = torch.ones(n, layout.num_heads)
    mask[torch.arange(n), torch.tensor(heads)] = 0.0
    row_mask = mask.repeat_interleave(rows, dim=0)  # (n * B, H): block k masks heads[k]
    hidden = state.hidden.repeat(n, 1, 1)  # (n * B, S, d)
    with mask_heads(model, {layer: row_mask}, layout):
        final = run_layers(model, layout, hidden, layer, layout.num_layers, state.layer_kwargs, batch_rows=rows)
    return target_loss_sums(model, layout, final, state.targets, rows, max_logit_rows)


def _score_layer(model: nn.Module, layout: ModelLayout, layer: int, states: list[ChunkState], n_items: int,
                 max_logit_rows: int) -> torch.Tensor:
    """(H, N) float64 target loss sums of every item with each head of ``layer`` masked."""
    sums = torch.zeros(layout.num_heads, n_items, dtype=torch.float64)
    for state in states:
        items = torch.tensor(state.batch.items)
        for group in head_groups(layout.num_heads, state.heads_per_pass):
            sums[torch.tensor(group).unsqueeze(1), items] = masked_loss_sums(
                model, layout, layer, state, group, max_logit_rows).cpu()
    return sums


@torch.inference_mode()
def score_heads_exact(
    model: nn.Module, calib: CalibrationSet, *, aggregate: str = "median", batch_size: int = 8,
    max_padding: float = 0.02, memory_budget: int | None = None, checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> HeadScores:
    """Exact causal head scores with prefix reuse, head batching and target-only logits.

    Args:
        model: a supported causal LM (unchanged on return).
        calib: the calibration set with its K subsets.
        aggregate: ``median`` (paper) or ``mean``.
        batch_size: at most this many calibration items per chunk.
        max_padding: a chunk's padding stays within this fraction of its real tokens.
        memory_budget: bytes of activations per masked pass (default
            :func:`default_memory_budget`); it sets the heads per pass and the logit rows.
        checkpoint_dir: folder for per-layer progress; an interrupted run scores only the layers
            not in it. It must belong to this model's weights (:func:`cap_lab.scoring.api.head_scores`
            keys it by the weight fingerprint); the calibration items and head geometry are checked
            here. With several ranks it must be one folder that all of them see.
        progress: show a progress bar over layers (rank 0's share only, with several ranks).

    When a :mod:`torch.distributed` process group is initialized, every rank must call this with
    the same model and calibration set (checked); each scores its share of the unfinished layers
    and all return the same result, equal to a one-process run's.

    Returns:
        :class:`cap_lab.scoring.types.HeadScores`, equal to the reference scorer's up to float
        rounding; ``settings`` records the chunking, the layers read from ``checkpoint_dir``
        (``resumed_layers``) and the number of ranks.
    """
    check_aggregate(aggregate)
    layout = get_layout(model)
    device = model_device(model)
    budget = int(memory_budget) if memory_budget is not None else default_memory_budget(device)
    if budget <= 0:
        raise ValueError(f"memory_budget={memory_budget}; must be > 0 bytes")
    vocab = layout.lm_head(model).out_features
    max_logit_rows = max(1, budget // (3 * 4 * vocab))  # logits, log-softmax, gradient-free temporaries
    n_items = len(calib.items)
    rank, world_size = distributed.world()
    signature = run_signature(calib, layout)
    distributed.check_same_on_all_ranks("calibration set or head geometry", signature)
    store = LayerCheckpoints(checkpoint_dir, signature) if checkpoint_dir else None
    done = store.finished() if store and rank == 0 else {}  # rank 0 reads (or clears) the progress
    finished = torch.zeros(layout.num_layers, dtype=torch.int64)
    finished[list(done)] = 1
    finished = distributed.broadcast_from_main(finished).bool()  # (L,), the same on every rank
    mine = distributed.my_share([l for l in range(layout.num_layers) if not finished[l]], rank, world_size)
    start = mine[0] if mine else layout.num_layers - 1

    lengths = [len(it.input_ids) for it in calib.items]
    intact_sums = torch.zeros(n_items, dtype=torch.float64)
    counts = torch.zeros(n_items, dtype=torch.float64)
    states, padded = [], 0
    for chunk in plan_chunks(lengths, batch_size, max_padding):
        batch = make_batch([calib.items[i] for i in chunk], tuple(chunk), calib.pad_token_id, device)
        rows, width = batch.input_ids.shape
        padded += rows * width
        captured = capture(model, layout, batch.input_ids, batch.attention_mask, start)
        targets = TargetTokens.from_labels(batch.labels)
        index = torch.tensor(chunk)
        intact_sums[index] = target_loss_sums(model, layout, captured.final, targets, rows, max_logit_rows)[0].cpu()
        counts[index] = torch.bincount(targets.rows, minlength=rows).double().cpu()
        per_pass = heads_per_pass(rows, width, activation_bytes_per_token(model, layout, width), layout.num_heads, budget)
        states.append(ChunkState(batch, targets, captured.hidden, captured.layer_kwargs, per_pass))

    sums = torch.zeros(layout.num_layers, layout.num_heads, n_items, dtype=torch.float64)  # (L, H, N)
    for layer, layer_sums in done.items():
        sums[layer] = layer_sums
    layers = layout.layers(model)
    desc = "scoring heads (exact)" + (f", rank {rank} of {world_size}" if world_size > 1 else "")
    bar = tqdm(total=len(mine), desc=desc, disable=not progress or rank != 0)
    for layer in range(start, mine[-1] + 1 if mine else start):
        if layer in mine:
            sums[layer] = _score_layer(model, layout, layer, states, n_items, max_logit_rows)
            if store:
                store.save(layer, sums[layer])
            bar.update()
        if layer < mine[-1]:
            for state in states:
                state.hidden = call_layer(layers[layer], state.hidden, state.layer_kwargs[layer])
    bar.close()
    if world_size > 1:  # each layer is non-zero on exactly one rank, so the sum is exact
        distributed.barrier()
        distributed.sum_across_ranks(sums)

    masked = torch.stack([subset_mean_losses(calib, sums[l, h], counts)
                          for l in range(layout.num_layers) for h in range(layout.num_heads)], dim=1)
    masked = masked.view(-1, layout.num_layers, layout.num_heads).float()  # (K, L, H), stored precision
    intact = subset_mean_losses(calib, intact_sums, counts).float()
    settings = {"method": "exact", "chunks": len(states), "padded_tokens": padded,
                "heads_per_pass": [s.heads_per_pass for s in states],
                "resumed_layers": finished.nonzero()[:, 0].tolist(), "ranks": world_size}
    return HeadScores(aggregate_scores(masked, intact, aggregate), masked, intact, aggregate, settings)
