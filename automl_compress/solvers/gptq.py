"""GPTQ: fixed-order quantization, lazy blocks, Cholesky reformulation (ALGORITHMS.md §2.1).

Every row quantizes its columns in one shared order, so the chain of downdated inverses is encoded
once in the upper Cholesky factor U of H⁻¹ (``H⁻¹ = UᵀU``): fixing column i of row w to q costs
``(w_i − q)² / (2 U_ii²)`` and the optimal correction of the later columns is
``w[i:] −= ((w_i − q) / U_ii) · U[i, i:]``. Inside a block of B columns the correction is applied
column by column; the rest of the matrix gets one GEMM per block.
"""

from __future__ import annotations

import torch

from automl_compress.errors import ShapeMismatchError
from automl_compress.solvers.checks import check_bits, check_hessian, check_weight
from automl_compress.solvers.hessian import (
    DEFAULT_DAMP,
    prepare_hessian,
    row_errors,
    upper_cholesky_of_inverse,
)
from automl_compress.solvers.quantizer import GridSpec, QuantGrid, fit_grid
from automl_compress.solvers.result import SolveResult


def solve_dtype(W: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The internal working precision: float64 on CPU, float32 on CUDA, unless given."""
    if dtype is not None:
        return dtype
    return torch.float32 if W.is_cuda else torch.float64


def column_order(H: torch.Tensor, act_order: bool) -> torch.Tensor:
    """Natural order, or act-order (decreasing diag H, ties by index)."""
    cols = H.shape[0]
    if not act_order:
        return torch.arange(cols, device=H.device)
    return torch.argsort(torch.diagonal(H), descending=True, stable=True)


def gptq_pass(
    W: torch.Tensor,
    U: torch.Tensor,
    grid: QuantGrid,
    keep: torch.Tensor | None,
    block_size: int,
) -> torch.Tensor:
    """One fixed-order pass over already-permuted columns.

    Args:
        W: (rows, cols) working copy in the solve dtype (modified in place).
        U: (cols, cols) upper Cholesky factor of the permuted, damped H⁻¹.
        grid: per-row grid (scale/zero in the solve dtype).
        keep: (rows, cols) bool, False where the weight must become 0; None = dense.
        block_size: lazy block width B.

    Returns:
        (rows, cols) quantized weights in the permuted column order.
    """
    rows, cols = W.shape
    Q = torch.zeros_like(W)
    scale, zero, maxq = grid.scale, grid.zero, grid.maxq
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2]
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            w = W1[:, j]
            q = scale * (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero)
            if keep is not None:
                q = torch.where(keep[:, i1 + j], q, torch.zeros_like(q))
            Q[:, i1 + j] = q
            e = (w - q) / U1[j, j]
            W1[:, j:] -= e[:, None] * U1[j, j:][None, :]
            E1[:, j] = e
        if i2 < cols:
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int = 4,
    *,
    grid: GridSpec | None = None,
    damp: float = DEFAULT_DAMP,
    block_size: int = 128,
    act_order: bool = False,
    mask: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    row_batch: int | None = None,
) -> SolveResult:
    """Quantize W with GPTQ.

    Args:
        W: (rows, cols) weights.
        H: (cols, cols) Hessian ``2·XᵀX/n``.
        bits: 2..8, or 0 to remove every row.
        grid: how the per-row grid is fitted (fitted once, up front, on the original W).
        damp: relative damping of H for the solve.
        block_size: lazy block width.
        act_order: quantize columns by decreasing diag(H).
        mask: (rows, cols) bool, False where the weight is pruned (target 0; 0 is on the grid).
        order: an explicit column order (overrides ``act_order``).
        dtype: working precision (default float64 on CPU, float32 on CUDA).
        row_batch: accepted for a uniform solver signature; GPTQ processes all rows at once.

    Returns:
        SolveResult with ``row_error`` under the undamped H.
    """
    del row_batch
    check_weight(W)
    check_hessian(H, W.shape[1])
    check_bits(bits)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, found {block_size}")
    if mask is not None and mask.shape != W.shape:
        raise ShapeMismatchError(
            f"mask must have W's shape {tuple(W.shape)}, found {tuple(mask.shape)}"
        )
    if bits == 0:
        W_hat = torch.zeros_like(W)
        return SolveResult(W_hat, row_errors(W, W_hat, H), bits=0, info={"method": "gptq"})
    dt = solve_dtype(W, dtype)
    g = fit_grid(W, bits, grid)
    prep = prepare_hessian(H.to(W.device), damp)
    perm = order.to(W.device) if order is not None else column_order(prep.H, act_order)
    inv = torch.argsort(perm)
    Wk = W.to(dt).clone()
    Wk[:, prep.dead] = 0.0
    keep = None
    if mask is not None:
        keep = mask.to(torch.bool)
        Wk = torch.where(keep, Wk, torch.zeros_like(Wk))
        keep = keep[:, perm]
    U = upper_cholesky_of_inverse(
        type(prep)(H=prep.H[perm][:, perm], dead=prep.dead[perm], damp=prep.damp)
    ).to(dt)
    grid_dt = QuantGrid(g.scale.to(dt), g.zero.to(dt), bits)
    Q = gptq_pass(Wk[:, perm].contiguous(), U, grid_dt, keep, block_size)[:, inv]
    W_hat = Q.to(W.dtype)
    return SolveResult(
        W_hat,
        row_errors(W, W_hat, H),
        mask=None if mask is None else mask.to(torch.bool),
        scale=g.scale,
        zero=g.zero,
        bits=bits,
        info={"method": "gptq", "act_order": act_order},
    )
