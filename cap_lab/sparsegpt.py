"""SparseGPT (Frantar & Alistarh, 2023, "Massive Language Models Can Be Accurately Pruned in One-Shot").

SparseGPT prunes one linear layer ``W`` (out, in) so that its outputs on the calibration inputs
``X`` (in, N tokens) change as little as possible, ``min ||W X - W' X||_F^2``, and *updates the
weights that survive* to compensate (the Optimal Brain Surgeon update), instead of only
zeroing. Per layer (paper Sec. 3, Algorithm 1):

1. the Hessian of that loss, ``H = 2 X X^T / N`` (in, in), over the non-padding calibration
   tokens (:class:`HessianStatistics`; the factor ``2 / N`` cancels in every step below but keeps
   the values in range);
2. dead inputs (``H_ii == 0``: feature i is zero on every token) get ``H_ii = 1`` and
   ``W[:, i] = 0`` (their weights do nothing, so they are pruned first); then damping,
   ``H += damping * mean(diag H) * I`` (``damping`` 0.01 = the paper's 1%);
3. ``U``, the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``). Row c of ``U``, divided by
   ``U_cc``, is row c of the inverse Hessian of the columns c.. (the ones not yet processed),
   divided by its diagonal entry: exactly the OBS update of those columns when column c's
   weight is removed, and ``U_cc^2`` the diagonal in the OBS saliency ``w^2 / [H_F^-1]_cc``;
4. columns in blocks of ``block_size`` (128): at the start of a block, the mask of the whole
   block is chosen from the *current* weights (already updated by the earlier blocks: the
   paper's adaptive mask selection) by the saliency ``W_rc^2 / U_cc^2``; then column by
   column, left to right: the removed weights' error ``e_r = W_rc / U_cc`` (0 where kept) is
   propagated to the rest of the block, ``W[:, c+1:] -= e U[c, c+1:]``, and, once the block is
   done, to all later columns in one matrix product (the paper's lazy batch updates).

Which weights are selected (stated precisely, since the reference differs from Wanda's per-row
rule): within each block of ``count`` columns, the lowest ``int(sparsity * out * count)``
saliencies of the whole block, all rows together (the block's (out, count) scores flattened in
row-major order, stable sort, so ties go to the lower row, then column). Rows therefore get
different sparsities, as in the reference (IST-DASLab/sparsegpt, ``prunen=0``; it takes
``score <= the int(n * s)-th smallest``, one weight more than this count, plus any ties). Per
matrix the count is :func:`sparsegpt_selected_count`, ``sum over blocks of int(s * out *
count)``: exactly ``s * numel`` when every block's ``s * out * count`` is whole (e.g. 50% with an
even ``out``). The matrix's zeros equal that count unless a block holds more weights of dead
inputs than it selects (they are zeroed anyway) or a kept weight is exactly zero.

N:M (``nm=(N, M)``; the paper's semi-structured extension, the reference's ``prunen``/``prunem``):
instead of the block mask, each group of M consecutive columns gets its mask when the column loop
reaches the group's first column, from the saliencies of the weights as updated so far: in every
row the M - N lowest of the group are removed (:func:`cap_lab.selection.nm_prune_mask`). The blocks must
hold whole groups (``block_size`` a multiple of M), and the removed count is exactly
``(M - N) / M * numel`` (before dead inputs).

Precision: the computation runs in float32 (float64 for a float64 weight), whatever the
model's dtype; :func:`sparsegpt_prune_weight` is pure and returns the mask and the new weight;
:func:`cap_lab.pruning.apply_weight_updates` writes them.
"""
from __future__ import annotations

import torch
from torch import nn

from cap_lab.selection import check_nm, nm_prune_mask


class HessianStatistics:
    """``X X^T`` and the token count of every linear of one decoder layer, over non-padding tokens.

    Attributes:
        sums: ``{name: (in, in)}`` running ``sum_t x_t x_t^T`` in float32, on the inputs' device.
        tokens: ``{name: number of tokens added}``.
    """

    def __init__(self, modules: dict[str, nn.Linear]):
        self.sums = {n: None for n in modules}
        self.tokens = {n: 0 for n in modules}

    def add(self, name: str, x: torch.Tensor, token_mask: torch.Tensor) -> None:
        """Add one batch: ``x`` (B, S, in) entering ``name``, ``token_mask`` (B, S) with 1 for real tokens."""
        rows = x[token_mask.to(x.device).bool()].float()  # (T, in)
        product = rows.T @ rows  # (in, in)
        self.sums[name] = product if self.sums[name] is None else self.sums[name].add_(product)
        self.tokens[name] += rows.shape[0]

    def hessian(self, name: str) -> torch.Tensor:
        """(in, in) ``H = 2 X X^T / N`` of linear ``name``.

        Raises:
            ValueError: no calibration token was added for ``name``.
        """
        if self.sums[name] is None or self.tokens[name] == 0:
            raise ValueError(f"no calibration token reached {name!r}; SparseGPT needs at least one")
        return self.sums[name] * (2.0 / self.tokens[name])


def sparsegpt_selected_count(rows: int, cols: int, sparsity: float, block_size: int = 128,
                             nm: tuple[int, int] | None = None) -> int:
    """How many weights :func:`sparsegpt_prune_weight` selects in a (rows, cols) matrix."""
    if nm is not None:
        return rows * cols // nm[1] * (nm[1] - nm[0])
    return sum(int(sparsity * rows * (min(start + block_size, cols) - start)) for start in range(0, cols, block_size))


def check_nm_blocks(block_size: int, nm: tuple[int, int]) -> tuple[int, int]:
    """An N:M pattern ``(n, m)`` that blocks of ``block_size`` columns hold whole groups of (else ValueError)."""
    n, m = check_nm(nm)
    if block_size % m:
        raise ValueError(f"sparsegpt_block_size={block_size} with nm={n}:{m}: SparseGPT's blocks must hold whole "
                         f"groups, a multiple of M={m}")
    return n, m


def _check_nm(weight: torch.Tensor, block_size: int, nm: tuple[int, int]) -> tuple[int, int]:
    n, m = check_nm_blocks(block_size, nm)
    if weight.shape[1] % m:
        raise ValueError(f"N:M sparsity with M={m}: weight of shape {tuple(weight.shape)} (out, in), and "
                         f"in={weight.shape[1]} is not a multiple of M")
    return n, m


def _check(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, block_size: int, damping: float) -> None:
    if weight.dim() != 2 or tuple(hessian.shape) != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight of shape {tuple(weight.shape)} and Hessian of shape {tuple(hessian.shape)}; "
                         "expected (out, in) and (in, in)")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity={sparsity!r} is outside [0, 1)")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r}; must be an integer >= 1")
    if not 0.0 <= float(damping) < 1.0:
        raise ValueError(f"damping={damping!r} is outside [0, 1)")


def inverse_hessian_factor(hessian: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-3: (in, in) Hessian -> ``(U, dead)``, U upper with ``(H + damping)^-1 = U^T U``, dead (in,) bool.

    Raises:
        ValueError: the damped Hessian is not positive definite (e.g. ``damping=0`` with fewer
            calibration tokens than input features).
    """
    h = hessian.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    torch.diagonal(h).add_(damping * torch.diagonal(h).mean())
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))  # (in, in) H^-1
        return torch.linalg.cholesky(inverse, upper=True), dead
    except torch.linalg.LinAlgError as error:
        raise ValueError(f"the damped Hessian ({h.shape[0]} inputs) is not positive definite with damping={damping}; "
                         "use a larger damping or more calibration tokens") from error


def _block_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """(out, count) saliencies -> bool mask of the lowest ``int(sparsity * numel)``, row-major stable order."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    k = int(sparsity * scores.numel())
    if k:
        mask[torch.sort(scores.flatten(), stable=True).indices[:k]] = True
    return mask.view_as(scores)


@torch.no_grad()
def sparsegpt_prune_weight(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, block_size: int = 128,
                           damping: float = 0.01, nm: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one linear's weight with SparseGPT (pure: ``weight`` is not changed).

    Args:
        weight: (out, in) the layer's weight, any floating dtype, on any device.
        hessian: (in, in) ``2 X X^T / N`` of its calibration inputs (:class:`HessianStatistics`).
        sparsity: fraction of each block's weights to remove, in [0, 1).
        block_size: columns per block (mask selection and lazy updates), 128 in the paper.
        damping: fraction of the mean Hessian diagonal added to it, 0.01 in the paper.
        nm: ``(N, M)``: the N:M pattern instead of ``sparsity`` (see the module docstring).

    Returns:
        ``(mask, new_weight)``: (out, in) bool, True where removed (exactly
        :func:`sparsegpt_selected_count` entries), and (out, in) float32 (float64 for a float64
        weight) updated weights, zero where masked, on ``weight``'s device.

    Example:
        >>> x = torch.randn(256, 24)                                  # tokens, in
        >>> mask, w = sparsegpt_prune_weight(torch.randn(8, 24), 2 * x.T @ x / 256, 0.5, block_size=8)
        >>> int(mask.sum()), bool((w[mask] == 0).all())
        (96, True)
    """
    _check(weight, hessian, sparsity, block_size, damping)
    n, m = _check_nm(weight, block_size, nm) if nm is not None else (0, 0)
    dtype = torch.promote_types(weight.dtype, torch.float32)
    wt = weight.detach().to(dtype).T.contiguous()  # (in, out): W's column c is row c, contiguous for the column loop
    u, dead = inverse_hessian_factor(hessian.detach().to(wt.device, dtype), damping)  # (in, in), (in,)
    wt[dead] = 0.0
    mask_t = torch.zeros_like(wt, dtype=torch.bool)  # (in, out)
    for start in range(0, wt.shape[0], block_size):
        end = min(start + block_size, wt.shape[0])
        block, u_block = wt[start:end], u[start:end, start:end]  # views (count, out), (count, count)
        diag = torch.diagonal(u_block)  # (count,)
        block_mask = (_block_mask(((block / diag[:, None]) ** 2).T, sparsity).T.contiguous() if not m
                      else torch.zeros_like(block, dtype=torch.bool))  # (count, out), adaptive: current weights
        errors = torch.zeros_like(block)  # (count, out): e = removed weight / U_cc, 0 where kept
        for c in range(end - start):
            if m and c % m == 0:  # N:M: this group's mask from the weights as updated so far
                block_mask[c:c + m] = nm_prune_mask(((block[c:c + m] / diag[c:c + m, None]) ** 2).T, n, m).T
            torch.div(block[c] * block_mask[c], diag[c], out=errors[c])
            block[c + 1:].addr_(u_block[c, c + 1:], errors[c], alpha=-1.0)  # OBS update inside the block
        block.masked_fill_(block_mask, 0.0)
        wt[end:] -= u[start:end, end:].T @ errors  # lazy update of every later column, (rest, out)
        mask_t[start:end] = block_mask
    return mask_t.T.contiguous(), wt.T.contiguous()
