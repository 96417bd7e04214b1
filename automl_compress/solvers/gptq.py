"""GPTQ: fixed-order quantization, lazy blocks, Cholesky reformulation.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ", ICLR 2023 (arXiv 2210.17323); docs/solvers.md §6.
Every row quantizes its columns in one shared order, so the chain of downdated inverses is encoded
once in the upper Cholesky factor U of H⁻¹ and the pass is the shared column sweep
(:func:`~automl_compress.solvers.sweep.column_sweep`) with each column's nearest grid point as
its target.

Example (2×2, 2 bits)::

    >>> import torch
    >>> W = torch.tensor([[0.30, -0.70], [0.90, 0.10]], dtype=torch.float64)
    >>> H = torch.tensor([[2.0, 0.6], [0.6, 1.0]], dtype=torch.float64)
    >>> gptq_quantize(W, H, bits=2, damp=0.0).codes().tolist()
    [[3, 0], [3, 2]]
"""

from __future__ import annotations

import torch

from automl_compress.errors import ShapeMismatchError
from automl_compress.solvers.checks import check_bits, check_hessian, check_weight
from automl_compress.solvers.hessian import (
    DEFAULT_DAMP,
    InverseFactors,
    permuted_upper,
    prepare_hessian,
    row_errors,
)
from automl_compress.solvers.numerics import solve_dtype
from automl_compress.solvers.quantizer import GridSpec, QuantGrid, fit_grid
from automl_compress.solvers.result import SolveResult
from automl_compress.solvers.sweep import Target, column_sweep


def column_order(H: torch.Tensor, act_order: bool) -> torch.Tensor:
    """Natural order, or act-order (decreasing diag H, ties by index)."""
    cols = H.shape[0]
    if not act_order:
        return torch.arange(cols, device=H.device)
    return torch.argsort(torch.diagonal(H), descending=True, stable=True)


def quantize_target(grid: QuantGrid, keep: torch.Tensor | None) -> Target:
    """The sweep target of GPTQ: each column's nearest grid point (0 where ``keep`` is False)."""
    scale, zero, maxq = grid.scale, grid.zero, grid.maxq

    def target(i: int, W1: torch.Tensor, j: int) -> torch.Tensor:
        q = torch.div(W1[:, j], scale).round_().add_(zero).clamp_(0, maxq).sub_(zero).mul_(scale)
        return q if keep is None else q.masked_fill(~keep[:, i], 0.0)

    return target


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
    factors: InverseFactors | None = None,
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
        dtype: working precision (default: :func:`~automl_compress.solvers.numerics.solve_dtype`).
        row_batch: rows per sweep (default: all rows at once; rows are independent, so the
            result does not depend on it).
        factors: H's factors shared with other solves of the same H (the result does not
            depend on it).

    Returns:
        SolveResult with ``row_error`` under the undamped H.
    """
    check_weight(W)
    rows = W.shape[0]
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
    H = H.to(W.device)
    prep = factors.prepared(H, damp) if factors is not None else prepare_hessian(H, damp)
    perm = order.to(W.device) if order is not None else column_order(prep.H, act_order)
    inv = torch.argsort(perm)
    Wk = W.to(dt).clone()
    Wk[:, prep.dead] = 0.0
    keep = None
    if mask is not None:
        keep = mask.to(torch.bool)
        Wk = torch.where(keep, Wk, torch.zeros_like(Wk))
        keep = keep[:, perm]
    U = (factors.upper(H, damp, perm) if factors is not None else permuted_upper(prep, perm)).to(dt)
    grid_dt = QuantGrid(g.scale.to(dt), g.zero.to(dt), bits)
    Wp = Wk[:, perm].contiguous()
    Q = torch.empty_like(Wp)
    R = row_batch or max(rows, 1)
    for r1 in range(0, rows, R):
        b = slice(r1, min(r1 + R, rows))
        g_b = QuantGrid(grid_dt.scale[b], grid_dt.zero[b], bits)
        Q[b] = column_sweep(Wp[b], U, quantize_target(g_b, None if keep is None else keep[b]),
                            block_size)
    Q = Q[:, inv]
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
