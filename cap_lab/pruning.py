"""Weight pruning: CAP (paper Sec. 3.3, Eq. 3-4) and the baselines it is compared with.

CAP turns head scores into weight scores (:mod:`cap_lab.cap_scores`):

* importance factors ``I = 1 + 9 (s - min s) / (max s - min s)`` in [1, 10], all 1 when every
  score is equal (Eq. 3);
* region mapping: ``q_proj`` rows and ``o_proj`` columns of query head h get ``I[l, h]``;
  ``k_proj``/``v_proj`` rows of key/value head g get the mean (``kv_reduce="mean"``, default)
  or the max (``"max"``) of the factors of the query heads that share g under grouped-query
  attention (the paper is silent on GQA: the mean treats the shared projection as serving its
  group on average, the max protects it as much as its most important reader); MLP projections
  (gate/up/down) get the layer's mean head factor;
* weight score ``|W| * I`` (Eq. 4), and one global threshold over all decoder attention and MLP
  linear weights (never embeddings, norms, biases or ``lm_head``), found by a search over the
  threshold (:func:`global_threshold`: a sampled bracket, then an exact order statistic inside
  it) that prunes exactly the target count, well within ``tolerance`` (1e-4 absolute).
  Counting is done per matrix, so no tensor of all scores is ever built. If scores tie at the
  threshold, the tied weights are taken in parameter order until the target is met.

CAP variants (``PruneConfig`` fields; their defaults are the paper's CAP, bit for bit):
``cap_mlp_factors="neuron"``: MLP weights get per-neuron factors (Eq. 3 over the neuron scores
of :mod:`cap_lab.scoring.neurons`) instead of the layer's mean head factor; ``cap_activation``:
the score ``|W_ij| * ||X_j||_2 * I`` (Wanda's statistic, X from one forward of the *dense* model
over the calibration set, :func:`~cap_lab.sparsity_allocation.input_sq_sums`); ``cap_scope=
"layer"``/``"row"``: every decoder layer / output row (Wanda's group) pruned to the target. Method
``cap_heads`` (Sec. 6, :mod:`cap_lab.head_pruning`) removes whole query heads, lowest causal score first,
until the q/o weights reach the target (k/v rows of fully removed GQA groups; MLP as CAP, exactly s).

Baselines, on the same calibration inputs and the same linear layers:

* ``wanda``: ``|W_ij| * ||X_j||_2`` with input-feature norms over all non-padding calibration
  tokens, pruned per output row at the target sparsity (the lowest ``int(in * s)`` of each row,
  stable sort), layer by layer with each layer's inputs taken from the already pruned earlier
  layers, as locuslab/wanda does (:mod:`cap_lab.wanda`, :mod:`cap_lab.sequential`). For a model larger than the
  accelerator, ``execution_device`` runs it with only the current layer there
  (:func:`cap_lab.modeling.offload.onload_layers`); the masks are the same as with the whole
  model on one device (tested);
* ``sparsegpt`` (Frantar & Alistarh, 2023; :mod:`cap_lab.sparsegpt`): the OBS update of the
  surviving weights from each linear's Hessian ``2 X X^T``, on the same calibration tokens, in
  the same sequential loop and with the same ``execution_device`` as ``wanda``; each matrix
  loses exactly :func:`~cap_lab.sparsegpt.sparsegpt_selected_count` weights (``s * numel`` at
  50% with an even output size);
* ``magnitude``: ``|W|`` with one global threshold (``magnitude_scope="global"``) or the same
  sparsity in every matrix (``"layer"``);
* ``random``: a seeded random choice of the same fraction of each matrix; weights that are
  already zero (a de-quantized checkpoint has some) are chosen first, so the achieved
  sparsity is the target, not the target plus the checkpoint's own zeros.

Options of every method (but ``cap_heads``): ``nm=(N, M)``, N:M sparsity by the method's own score (exactly
(M - N) / M, :mod:`cap_lab.selection`); ``owl``, OWL's per-layer sparsities s_l
(:mod:`cap_lab.sparsity_allocation`), each layer pruned to s_l as the method prunes a model (one
threshold per layer for CAP and global magnitude).

:func:`apply_pruning_masks` and :func:`apply_weight_updates` are the only functions in cap_lab that
change a model's weights: the first only sets selected weights to zero (every method); the
second also replaces the surviving weights by updated ones (``sparsegpt``'s OBS update), then
zeroes the selected ones through the first.
"""
from __future__ import annotations

import zlib
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import pandas as pd
import torch
from torch import nn

from cap_lab.calibration import CalibrationSet
from cap_lab.cap_scores import KV_REDUCE, MLP_FACTORS, cap_score_fn, neuron_importance_factors
from cap_lab.head_pruning import HEAD_METHOD, check_head_pruning_options, head_pruning_masks
from cap_lab.modeling import ModelLayout, get_layout, onload_layers
from cap_lab.selection import ScoreFn, check_nm_shapes, nm_and_sparsity, select_masks
from cap_lab.sequential import prune_layers_sequentially
from cap_lab.sparsegpt import HessianStatistics, check_nm_blocks, sparsegpt_prune_weight
from cap_lab.sparsity_allocation import (
    OWL_LAMBDA, OWL_M, OWLAllocation, check_owl_settings, input_sq_sums, owl_allocation,
)
from cap_lab.wanda import InputNormStatistics, wanda_row_mask

PRUNE_METHODS = ("cap", "wanda", "magnitude", "random", "sparsegpt", HEAD_METHOD)
SEQUENTIAL_METHODS = ("wanda", "sparsegpt")
MAGNITUDE_SCOPES = ("global", "layer")
CAP_SCOPES = ("global", "layer", "row")
MATRIX_TYPES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how.

    Attributes:
        method: ``cap``, ``wanda``, ``magnitude``, ``random``, ``sparsegpt`` or ``cap_heads`` (whole heads).
        sparsity: target fraction of prunable weights set to zero, in [0, 1); ``None``: 0.2, or
            with ``nm`` exactly (M - N) / M (a given sparsity must equal it).
        kv_reduce: how k/v rows shared by several query heads get their factor (``mean``/``max``).
        magnitude_scope: ``global`` threshold or the same sparsity per ``layer`` (magnitude only).
        seed: seed of ``random``.
        tolerance: allowed |achieved - target| sparsity of global-threshold methods.
        sparsegpt_block_size: columns per block of ``sparsegpt`` (mask selection, lazy updates).
        sparsegpt_damping: fraction of the mean Hessian diagonal added to it (``sparsegpt``).
        nm: ``(N, M)``, e.g. ``(2, 4)``: keep N of every M consecutive inputs of each row.
        owl: OWL layer-wise sparsity allocation (needs a calibration set); not with ``nm``.
        owl_lambda: OWL's bound: every layer's sparsity within ``sparsity`` +/- lambda.
        owl_m: OWL's outlier multiple M (a Wanda score above M x its layer's mean).
        cap_mlp_factors: ``cap``: ``layer_mean`` (paper: every MLP weight gets its layer's mean
            head factor) or ``neuron`` (gate/up row j and down column j get neuron j's factor;
            needs ``neuron_scores``).
        cap_activation: ``cap``: score ``|W_ij| * ||X_j||_2 * I`` (X norms from one dense forward
            over the calibration set, so it needs one) instead of ``|W| * I``.
        cap_scope: ``cap``: one ``global`` threshold, one per ``layer`` (each pruned to ``sparsity``;
            with ``owl`` to its own), or per output ``row`` (the lowest ``int(in * s)`` of every row).
    """

    method: str = "cap"
    sparsity: float | None = None
    kv_reduce: str = "mean"
    magnitude_scope: str = "global"
    seed: int = 0
    tolerance: float = 1e-4
    sparsegpt_block_size: int = 128
    sparsegpt_damping: float = 0.01
    nm: tuple[int, int] | None = None
    owl: bool = False
    owl_lambda: float = OWL_LAMBDA
    owl_m: float = OWL_M
    cap_mlp_factors: str = "layer_mean"
    cap_activation: bool = False
    cap_scope: str = "global"

    def __post_init__(self) -> None:
        nm, sparsity = nm_and_sparsity(self.nm, self.sparsity)  # the one place a None sparsity is resolved
        object.__setattr__(self, "nm", nm)
        object.__setattr__(self, "sparsity", sparsity)
        check_owl_settings(float(sparsity) if self.owl else 0.0, self.owl_lambda, self.owl_m, nm if self.owl else None)
        if self.method not in PRUNE_METHODS:
            raise ValueError(f"unknown pruning method {self.method!r}; allowed: {', '.join(PRUNE_METHODS)}")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity={self.sparsity!r} is outside [0, 1)")
        if self.kv_reduce not in KV_REDUCE:
            raise ValueError(f"kv_reduce={self.kv_reduce!r}; allowed: {', '.join(KV_REDUCE)}")
        if self.magnitude_scope not in MAGNITUDE_SCOPES:
            raise ValueError(f"magnitude_scope={self.magnitude_scope!r}; allowed: {', '.join(MAGNITUDE_SCOPES)}")
        if not 0 < self.tolerance < 0.5:
            raise ValueError(f"tolerance={self.tolerance!r}; must be in (0, 0.5)")
        if type(self.sparsegpt_block_size) is not int or self.sparsegpt_block_size < 1:
            raise ValueError(f"sparsegpt_block_size={self.sparsegpt_block_size!r}; must be an integer >= 1")
        if not 0.0 <= float(self.sparsegpt_damping) < 1.0:
            raise ValueError(f"sparsegpt_damping={self.sparsegpt_damping!r} is outside [0, 1)")
        if self.method == HEAD_METHOD:
            check_head_pruning_options(nm, self.owl)
        if self.method == "sparsegpt" and nm is not None:
            check_nm_blocks(self.sparsegpt_block_size, nm)
        self._check_cap_variants()

    def _check_cap_variants(self) -> None:
        if self.cap_mlp_factors not in MLP_FACTORS:
            raise ValueError(f"cap_mlp_factors={self.cap_mlp_factors!r}; allowed: {', '.join(MLP_FACTORS)}")
        if self.cap_scope not in CAP_SCOPES:
            raise ValueError(f"cap_scope={self.cap_scope!r}; allowed: {', '.join(CAP_SCOPES)}")
        if not isinstance(self.cap_activation, bool):
            raise ValueError(f"cap_activation={self.cap_activation!r}; allowed: True, False")
        defaults = {"cap_mlp_factors": "layer_mean", "cap_activation": False, "cap_scope": "global"}
        changed = [f"{k}={getattr(self, k)!r}" for k, v in defaults.items() if getattr(self, k) != v]
        if changed and self.method != "cap":
            raise ValueError(f"{', '.join(changed)}: a CAP variant, for method 'cap' only, not {self.method!r}")
        if self.cap_scope != "global" and self.nm is not None:
            raise ValueError(f"cap_scope={self.cap_scope!r} with nm={self.nm[0]}:{self.nm[1]}: an N:M pattern already prunes "
                             f"every layer to (M - N) / M; choose one")


# ------------------------------------------------------------------ baseline scores (pure)
def magnitude_score_fn(layer: int, name: str, w: torch.Tensor) -> torch.Tensor:
    return w.detach().abs().float()


def random_score_fn(seed: int) -> ScoreFn:
    def fn(layer: int, name: str, w: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{layer}:{name}".encode()))
        draw = torch.rand(w.shape, generator=g).to(w.device)  # in [0, 1)
        return torch.where(w == 0, -1.0, draw)  # existing zeros first

    return fn


def sequential_prune(model: nn.Module, layout: ModelLayout, calib: CalibrationSet, config: PruneConfig,
                     batch_size: int = 8, progress: bool = True,
                     execution_device: str | torch.device | None = None,
                     layer_sparsity: Sequence[float] | None = None) -> int:
    """``wanda`` or ``sparsegpt`` over all layers in order (:mod:`cap_lab.sequential`); returns the weights selected.

    Layer l's statistics come from the model with layers 0..l-1 already pruned: Wanda's are
    sums of squares of each input feature over the non-padding tokens (its running mean differs
    by a constant factor, which leaves every row's order unchanged), SparseGPT's ``2 X X^T / N``
    (:class:`cap_lab.sparsegpt.HessianStatistics`). ``execution_device``: run with only the
    current decoder layer on this device (:func:`cap_lab.modeling.offload.onload_layers`;
    ``None``: where the model is). ``layer_sparsity``: (L,) one sparsity per layer (OWL).
    """
    block_size, damping, nm = config.sparsegpt_block_size, config.sparsegpt_damping, config.nm
    s = (lambda layer: config.sparsity) if layer_sparsity is None else (lambda layer: float(layer_sparsity[layer]))
    if config.method == "wanda":
        new_statistics = InputNormStatistics
        prune_layer = lambda layer, modules, stats: apply_pruning_masks(  # noqa: E731
            (m, wanda_row_mask(m.weight, stats.sums[n], s(layer), nm)) for n, m in modules.items())
    elif config.method == "sparsegpt":
        new_statistics = HessianStatistics
        prune_layer = lambda layer, modules, stats: apply_weight_updates(  # noqa: E731
            (m, *sparsegpt_prune_weight(m.weight, stats.hessian(n), s(layer), block_size, damping, nm))
            for n, m in modules.items())
    else:
        raise ValueError(f"method {config.method!r} is not sequential; sequential methods: wanda, sparsegpt")
    with ExitStack() as stack:
        onloader = (stack.enter_context(onload_layers(model, layout, execution_device))
                    if execution_device is not None else None)
        return prune_layers_sequentially(model, layout, calib, new_statistics, prune_layer, batch_size=batch_size,
                                         progress=progress, onloader=onloader, desc=f"{config.method} layers")


# ------------------------------------------------------------------ the two mutations
@torch.no_grad()
def apply_pruning_masks(masks: Iterable[tuple[nn.Linear, torch.Tensor]]) -> int:
    """Set every weight selected by a mask exactly to zero, in place. Returns how many were selected.

    With :func:`apply_weight_updates` (which calls it), the only function in cap_lab that
    changes model weights.
    """
    selected = 0
    for module, mask in masks:
        module.weight.masked_fill_(mask.to(module.weight.device), 0)
        selected += int(mask.sum())
    return selected


@torch.no_grad()
def apply_weight_updates(updates: Iterable[tuple[nn.Linear, torch.Tensor, torch.Tensor]]) -> int:
    """Replace weights by updated ones, then zero the selected ones exactly. Returns how many were selected.

    The only other writer of model weights besides :func:`apply_pruning_masks`: for methods
    that change the surviving weights too (``sparsegpt``'s OBS update).

    Args:
        updates: ``(module, mask, new_weight)``: mask (out, in) bool, True = prune; new_weight
            (out, in), any dtype and device (cast to the module's).
    """
    def written():
        for module, mask, new_weight in updates:
            if tuple(new_weight.shape) != tuple(module.weight.shape):
                raise ValueError(f"new weight of shape {tuple(new_weight.shape)} for a weight of shape "
                                 f"{tuple(module.weight.shape)}")
            module.weight.copy_(new_weight)
            yield module, mask

    return apply_pruning_masks(written())


# ------------------------------------------------------------------ driver
@dataclass(frozen=True)
class PruneResult:
    """Outcome of :func:`prune_model`.

    Attributes:
        config: the settings used.
        target_sparsity: what was asked.
        achieved_sparsity: fraction of prunable weights that are now zero.
        selected: number of weights the method selected.
        total: number of prunable weights.
        threshold: the global threshold (global-threshold methods), else ``None``.
        report: per-matrix sparsity (see :func:`sparsity_report`).
        allocation: OWL's outlier ratios and per-layer sparsities (``owl``), else ``None``.
        removed_heads: (L, H) bool, the heads ``cap_heads`` removed, else ``None``.
    """

    config: PruneConfig
    target_sparsity: float
    achieved_sparsity: float
    selected: int
    total: int
    threshold: float | None
    report: pd.DataFrame
    allocation: OWLAllocation | None = None
    removed_heads: torch.Tensor | None = None

    def summary(self) -> dict:
        heads = {} if self.removed_heads is None else {"removed_heads": self.removed_heads.int().tolist()}
        return dict(asdict(self.config), target_sparsity=self.target_sparsity, achieved_sparsity=self.achieved_sparsity,
                    selected=self.selected, total=self.total, threshold=self.threshold,
                    owl_allocation=self.allocation.to_dict() if self.allocation else None, **heads)


def prune_model(model: nn.Module, config: PruneConfig, *, head_scores: torch.Tensor | None = None,
                calib: CalibrationSet | None = None, batch_size: int = 8, progress: bool = True,
                execution_device: str | torch.device | None = None,
                neuron_scores: Sequence[torch.Tensor] | torch.Tensor | None = None) -> PruneResult:
    """Prune a model in place to ``config.sparsity``.

    Args:
        model: a supported causal LM (changed in place).
        config: method and target.
        head_scores: (L, H) causal scores, required by ``cap`` and ``cap_heads``.
        calib: calibration set, required by ``wanda``, ``sparsegpt``, ``owl`` and ``cap_activation``.
        batch_size: calibration items per forward (``wanda``, ``sparsegpt``).
        progress: progress bar (their layer loop).
        execution_device: for a model larger than the accelerator: keep it on the CPU and give the accelerator
            here; ``wanda`` and ``sparsegpt`` then run with one decoder layer at a time on it
            (:func:`cap_lab.modeling.offload.onload_layers`) and leave every weight where it was. An execution
            detail, not a setting, so not part of :class:`PruneConfig`: the masks are the same either way. The
            other methods run no forward (they score each matrix where it lies), except OWL's and
            ``cap_activation``'s measuring pass.
        neuron_scores: one (I,) tensor of causal MLP-neuron scores per decoder layer (or an (L, I)
            tensor; :func:`cap_lab.scoring.neurons.score_neurons_attribution`), required by
            ``cap_mlp_factors="neuron"``.

    Returns:
        A :class:`PruneResult` with the achieved sparsity and a per-matrix report.
    """
    layout = get_layout(model)
    targets = layout.linear_weights(model)
    total = sum(m.weight.numel() for _, _, m in targets)
    if (config.method in SEQUENTIAL_METHODS or config.owl or config.cap_activation) and calib is None:
        extra = " with owl" if config.owl else " with cap_activation" if config.cap_activation else ""
        raise ValueError(f"method {config.method!r}{extra} needs a calibration set")
    if config.nm is not None:
        check_nm_shapes(targets, config.nm[1])  # before any weight is pruned
    if neuron_scores is not None and config.cap_mlp_factors != "neuron":
        raise ValueError(f"neuron_scores are used by method 'cap' with cap_mlp_factors='neuron' only, not "
                         f"method={config.method!r}, cap_mlp_factors={config.cap_mlp_factors!r}")
    if config.method in ("cap", HEAD_METHOD):  # they need (L, H) causal head scores
        if head_scores is None:
            raise ValueError(f"method {config.method!r} needs head_scores (see cap_lab.scoring.head_scores)")
        if tuple(head_scores.shape) != (layout.num_layers, layout.num_heads):
            raise ValueError(f"head_scores shape {tuple(head_scores.shape)}; expected ({layout.num_layers}, {layout.num_heads})")
        if config.cap_mlp_factors == "neuron" and neuron_scores is None:
            raise ValueError("cap_mlp_factors='neuron' needs neuron_scores (see cap_lab.scoring.neurons)")
        widths = [m.in_features for _, n, m in targets if n == "down_proj"]  # (L,) intermediate sizes
        neuron_factors = (neuron_importance_factors(neuron_scores, layout, widths)  # (L, I)
                          if config.cap_mlp_factors == "neuron" else None)
    allocation = (owl_allocation(model, layout, calib, config.sparsity, config.owl_lambda, config.owl_m, batch_size,
                                 execution_device) if config.owl else None)
    shares = allocation.layer_sparsity.tolist() if allocation else None
    threshold, removed = None, None
    if config.method in SEQUENTIAL_METHODS:
        selected = sequential_prune(model, layout, calib, config, batch_size, progress, execution_device, shares)
    elif config.method == HEAD_METHOD:
        masks, threshold, removed = head_pruning_masks(head_scores, layout, targets, config.sparsity, config.tolerance)
        selected = apply_pruning_masks(masks)
    else:
        if config.method == "cap":
            sq_sums = (input_sq_sums(model, layout, calib, batch_size, execution_device)
                       if config.cap_activation else None)  # dense model, before any weight is pruned
            fn = cap_score_fn(head_scores, layout, config.kv_reduce, neuron_factors=neuron_factors, input_sq_sums=sq_sums)
            if config.cap_scope == "layer" and shares is None:
                shares = [float(config.sparsity)] * layout.num_layers  # one threshold per layer
        else:
            fn = random_score_fn(config.seed) if config.method == "random" else magnitude_score_fn
        per_matrix = config.method == "random" or (config.method == "magnitude" and config.magnitude_scope == "layer")
        scope = "matrix" if per_matrix else "row" if config.method == "cap" and config.cap_scope == "row" else "global"
        masks, threshold = select_masks(fn, targets, config.sparsity, scope=scope,
                                        nm=config.nm, layer_sparsity=shares, tolerance=config.tolerance)
        selected = apply_pruning_masks(masks)
    report = sparsity_report(model, layout)
    achieved = float(report["zeros"].sum() / report["numel"].sum())
    return PruneResult(config, float(config.sparsity), achieved, selected, total, threshold, report, allocation, removed)


def sparsity_report(model: nn.Module, layout: ModelLayout | None = None) -> pd.DataFrame:
    """Fraction of exact zeros in every prunable matrix.

    Returns:
        DataFrame with columns ``layer``, ``matrix`` (q/k/v/o/gate/up/down), ``numel``,
        ``zeros``, ``sparsity``. Group it by ``layer`` or ``matrix`` with :func:`sparsity_by`.
    """
    layout = layout or get_layout(model)
    rows = []
    for l, n, m in layout.linear_weights(model):
        zeros = int((m.weight == 0).sum())
        rows.append(dict(layer=l, matrix=MATRIX_TYPES[n], numel=m.weight.numel(), zeros=zeros, sparsity=zeros / m.weight.numel()))
    return pd.DataFrame(rows)


def sparsity_by(report: pd.DataFrame, key: str) -> pd.DataFrame:
    """Aggregate a :func:`sparsity_report` by ``layer`` or ``matrix``."""
    if key not in ("layer", "matrix"):
        raise ValueError(f"key={key!r}; allowed: layer, matrix")
    g = report.groupby(key, sort=key == "layer")[["numel", "zeros"]].sum()
    g["sparsity"] = g["zeros"] / g["numel"]
    return g.reset_index()


def attention_sparsity_per_head(model: nn.Module, layout: ModelLayout | None = None) -> torch.Tensor:
    """(L, H) fraction of zeros in each query head's q rows and o columns (for heatmaps)."""
    layout = layout or get_layout(model)
    d = layout.head_dim
    out = torch.zeros(layout.num_layers, layout.num_heads)
    for l in range(layout.num_layers):
        attn = layout.attention(model, l)
        q = (attn.q_proj.weight == 0).view(layout.num_heads, d, -1).float().mean(dim=(1, 2))
        o = (attn.o_proj.weight == 0).view(-1, layout.num_heads, d).float().mean(dim=(0, 2))
        out[l] = ((q + o) / 2).cpu()
    return out
