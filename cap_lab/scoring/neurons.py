"""Causal scores of MLP neurons: attribution patching, checked by exact ablation on a sample.

The paper gives every MLP weight its layer's mean head factor (Sec. 3.3, "Region mapping") and
names that an approximation (Sec. 7). Here each intermediate neuron j of layer l gets a causal
score of its own, defined like a head's (Eq. 1-2): the increase of the target cross-entropy when
the neuron is removed, i.e. when its activation ``a_j`` at the input of ``down_proj`` (the
``act(gate) * up`` feature, shape (B, S, I)) is set to zero; its ``gate``/``up`` rows and its
``down_proj`` column are the weights that serve it.

Scoring every neuron exactly would take L x I masked passes (over 450k for an 8B model), so the
scores are first-order estimates from one forward and one backward pass per calibration batch,
as :mod:`cap_lab.scoring.attribution` does for heads (attribution patching; Syed, Rager & Conmy
2023). With L_k the token-level mean target loss of subset k::

    Delta_k(l, j) = - sum_{tokens of D_k} dL_k/da_{l,j} . a_{l,j}

is stored as the masked loss ``L_k + Delta_k`` and aggregated by Eq. 2 exactly like a head score
(:func:`cap_lab.scoring.types.aggregate_scores`: median over the K subsets minus the mean
intact loss). Gradients are taken with ``torch.autograd.grad`` with respect to the
``down_proj`` inputs only (the ``down_proj`` hook site of :func:`cap_lab.modeling.capture`); no
parameter gets a ``.grad`` and no weight changes. The loss is the shared target
cross-entropy of :func:`cap_lab.modeling.target_loss_sums`.

The estimate is exact only for a loss linear in the neuron's activation (see the caveats in
:mod:`cap_lab.scoring.attribution`). :func:`check_neuron_scores` therefore ablates a seeded
random sample of neurons per layer exactly (a scoped :func:`cap_lab.modeling.mask_neurons`
hook zeroes each at the ``down_proj`` input; layers before it are replayed once, several
neurons share a pass by stacking the batch) and returns both scores of those neurons, so the
agreement can be reported as a Spearman correlation (:attr:`NeuronAblationCheck.spearman`).

Runs in one process (under torchrun every rank computes the same thing).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from cap_lab.calibration import CalibrationSet
from cap_lab.modeling import (
    TargetTokens, call_layer, capture, get_layout, mask_neurons, model_device, run_layers, target_loss_sums,
)
from cap_lab.scoring.types import aggregate_scores, check_aggregate, subset_mean_losses


@dataclass(frozen=True)
class NeuronScores:
    """First-order causal scores of every MLP neuron.

    Attributes:
        scores: (L, I) Eq. 2 scores; higher means removing the neuron hurts more.
        masked_losses: (K, L, I) intact loss of each subset plus the estimated change.
        intact_losses: (K,) mean target loss of each subset.
        aggregate: ``median`` or ``mean`` over subsets.
        settings: how they were made.
    """

    scores: torch.Tensor
    masked_losses: torch.Tensor
    intact_losses: torch.Tensor
    aggregate: str = "median"
    settings: dict = field(default_factory=dict)

    def per_layer(self) -> list[torch.Tensor]:
        """The scores as one (I,) tensor per layer (what :func:`cap_lab.pruning.prune_model` takes)."""
        return list(self.scores.unbind(0))


def score_neurons_attribution(model: nn.Module, calib: CalibrationSet, *, aggregate: str = "median",
                              batch_size: int = 8, progress: bool = True) -> NeuronScores:
    """Attribution-patching estimates of every MLP neuron's causal score (module docstring).

    Args:
        model: a supported causal LM (weights, ``requires_grad`` flags and ``.grad`` unchanged).
        calib: the calibration set with its K subsets.
        aggregate: ``median`` (as for heads) or ``mean`` over subsets.
        batch_size: calibration items per forward and backward.
        progress: progress bar over batches.

    Returns:
        :class:`NeuronScores` with (L, I) scores.
    """
    check_aggregate(aggregate)
    layout = get_layout(model)
    widths = {layout.down_proj(model, l).in_features for l in range(layout.num_layers)}
    if len(widths) != 1:
        raise ValueError(f"MLP widths differ across layers ({sorted(widths)}); one intermediate size is needed")
    width, k = widths.pop(), calib.config.n_subsets
    subset = torch.tensor([it.subset for it in calib.items])
    counts = torch.tensor([float(len(it.input_ids) - max(it.target_start, 1)) for it in calib.items], dtype=torch.float64)
    weight = 1.0 / torch.zeros(k, dtype=torch.float64).index_add_(0, subset, counts)[subset]  # (N,) dL_k / d(item sum)
    delta = torch.zeros(k, layout.num_layers, width, dtype=torch.float64)  # (K, L, I)
    intact_sums = torch.zeros(len(calib.items), dtype=torch.float64)
    batches = list(calib.batches(list(range(len(calib.items))), batch_size, model_device(model)))
    with torch.inference_mode(False), torch.enable_grad():
        for batch in tqdm(batches, desc="scoring neurons (attribution)", disable=not progress):
            acts: dict[int, torch.Tensor] = {}

            def keep(layer: int, x: torch.Tensor) -> torch.Tensor:  # x: (B, S, I)
                if not x.requires_grad:
                    x = x.detach().requires_grad_(True)
                acts[layer] = x
                return x

            captured = capture(model, layout, batch.input_ids, batch.attention_mask, 0, site_hooks={"down_proj": keep})
            rows, items = batch.input_ids.shape[0], torch.tensor(batch.items)
            sums = target_loss_sums(model, layout, captured.final, TargetTokens.from_labels(batch.labels), rows)[0]  # (B,)
            objective = (sums * weight[items].to(sums.device)).sum()
            grads = torch.autograd.grad(objective, [acts[l] for l in range(layout.num_layers)])
            for layer, g in enumerate(grads):
                per_item = -(g.double() * acts[layer].detach().double()).sum(dim=1).cpu()  # (B, I), float64 products
                delta[:, layer].index_add_(0, subset[items], per_item)
            intact_sums[items] = sums.detach().cpu()
            del captured, acts, grads, objective
    intact = subset_mean_losses(calib, intact_sums, counts)  # (K,) float64
    masked = (intact.view(-1, 1, 1) + delta).float()
    intact = intact.float()
    return NeuronScores(aggregate_scores(masked, intact, aggregate), masked, intact, aggregate,
                        {"method": "attribution", "batches": len(batches), "intermediate_size": width})


# ------------------------------------------------------------------ exact ablation of a sample
def sample_neurons(num_layers: int, width: int, per_layer: int, seed: int = 0) -> torch.Tensor:
    """A seeded random sample of ``per_layer`` distinct neurons of every layer.

    Returns:
        (L * per_layer, 2) int64 rows ``(layer, neuron)``, by layer, neurons ascending.
    """
    if not 1 <= per_layer <= width:
        raise ValueError(f"per_layer={per_layer!r}; must be in [1, {width}] (the intermediate size)")
    g = torch.Generator().manual_seed(seed)
    rows = [torch.stack([torch.full((per_layer,), l), torch.randperm(width, generator=g)[:per_layer].sort().values], 1)
            for l in range(num_layers)]
    return torch.cat(rows).long()


@torch.inference_mode()
def neuron_ablation_losses(model: nn.Module, calib: CalibrationSet, neurons: torch.Tensor, *, batch_size: int = 8,
                           neurons_per_pass: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact subset losses with each listed neuron zeroed at the ``down_proj`` input, one at a time.

    Per batch, one intact forward captures the layers' inputs; for layer l the batch is stacked
    n times (block k of rows zeroes the k-th neuron of the group) and only layers l..L-1 run.

    Args:
        model: a supported causal LM (unchanged on return).
        calib: the calibration set.
        neurons: (n, 2) rows ``(layer, neuron)``.
        batch_size: calibration items per forward.
        neurons_per_pass: at most this many neurons share one stacked pass.

    Returns:
        ``(masked, intact)``: (K, n) and (K,) float64 token-level mean target losses per subset.
    """
    layout = get_layout(model)
    neurons = torch.as_tensor(neurons, dtype=torch.long).view(-1, 2)
    if neurons.shape[0] == 0:
        raise ValueError("no neurons to ablate; give (n, 2) rows (layer, neuron) with n >= 1")
    if neurons_per_pass < 1:
        raise ValueError(f"neurons_per_pass={neurons_per_pass!r}; must be >= 1")
    for l, j in neurons.tolist():
        if not 0 <= l < layout.num_layers or not 0 <= j < layout.down_proj(model, l).in_features:
            raise ValueError(f"neuron ({l}, {j}) does not exist: {layout.num_layers} layers of "
                             f"{layout.down_proj(model, 0).in_features} neurons")
    n_items = len(calib.items)
    sums = torch.zeros(neurons.shape[0], n_items, dtype=torch.float64)  # (n, N)
    intact_sums, counts = torch.zeros(n_items, dtype=torch.float64), torch.zeros(n_items, dtype=torch.float64)
    layers = layout.layers(model)
    last = int(neurons[:, 0].max())
    for batch in calib.batches(list(range(n_items)), batch_size, model_device(model)):
        rows, items = batch.input_ids.shape[0], torch.tensor(batch.items)
        captured = capture(model, layout, batch.input_ids, batch.attention_mask, 0)
        targets = TargetTokens.from_labels(batch.labels)
        intact_sums[items] = target_loss_sums(model, layout, captured.final, targets, rows)[0].cpu()
        counts[items] = torch.bincount(targets.rows, minlength=rows).double().cpu()
        hidden = captured.hidden  # (B, S, d) entering the current layer
        for layer in range(last + 1):
            mine = (neurons[:, 0] == layer).nonzero()[:, 0]  # indices into neurons
            width = layout.down_proj(model, layer).in_features
            for group in mine.split(neurons_per_pass):
                mask = torch.ones(group.numel(), width)
                mask[torch.arange(group.numel()), neurons[group, 1]] = 0.0
                with mask_neurons(model, {layer: mask.repeat_interleave(rows, dim=0)}, layout):  # (n * B, I)
                    final = run_layers(model, layout, hidden.repeat(group.numel(), 1, 1), layer, layout.num_layers,
                                       captured.layer_kwargs, batch_rows=rows)
                sums[group.unsqueeze(1), items] = target_loss_sums(model, layout, final, targets, rows).cpu()
            if layer < last:
                hidden = call_layer(layers[layer], hidden, captured.layer_kwargs[layer])
    masked = torch.stack([subset_mean_losses(calib, s, counts) for s in sums], dim=1)  # (K, n)
    return masked, subset_mean_losses(calib, intact_sums, counts)


@dataclass(frozen=True)
class NeuronAblationCheck:
    """First-order neuron scores beside exact ablation scores of the same sampled neurons.

    Attributes:
        neurons: (n, 2) rows ``(layer, neuron)``.
        exact: (n,) Eq. 2 scores from exact ablation.
        estimated: (n,) the attribution scores of the same neurons.
        masked_losses: (K, n) exact subset losses with each neuron zeroed.
        intact_losses: (K,) exact subset losses of the intact model.
    """

    neurons: torch.Tensor
    exact: torch.Tensor
    estimated: torch.Tensor
    masked_losses: torch.Tensor
    intact_losses: torch.Tensor

    @property
    def spearman(self) -> float:
        """Spearman rank correlation of ``estimated`` and ``exact`` over the sample."""
        from scipy.stats import spearmanr

        return float(spearmanr(self.estimated.double().numpy(), self.exact.double().numpy()).statistic)


def check_neuron_scores(model: nn.Module, calib: CalibrationSet, scores: NeuronScores, *, per_layer: int = 8,
                        seed: int = 0, batch_size: int = 8, neurons_per_pass: int = 16) -> NeuronAblationCheck:
    """Ablate ``per_layer`` random neurons of every layer exactly and pair them with ``scores``.

    Args:
        model: the model ``scores`` were computed on (unchanged on return).
        calib: the calibration set they were computed on.
        scores: :func:`score_neurons_attribution`'s result.
        per_layer: neurons sampled per layer (seeded by ``seed``).
        seed: sampling seed.
        batch_size: calibration items per forward.
        neurons_per_pass: neurons stacked in one pass (memory).

    Returns:
        A :class:`NeuronAblationCheck` (exact scores aggregated like ``scores``).
    """
    num_layers, width = scores.scores.shape
    neurons = sample_neurons(num_layers, width, per_layer, seed)
    masked, intact = neuron_ablation_losses(model, calib, neurons, batch_size=batch_size,
                                            neurons_per_pass=neurons_per_pass)
    masked, intact = masked.float(), intact.float()
    exact = aggregate_scores(masked, intact, scores.aggregate)  # (n,)
    return NeuronAblationCheck(neurons, exact, scores.scores[neurons[:, 0], neurons[:, 1]], masked, intact)
