"""Data-free baselines: round-to-nearest quantization and magnitude pruning.

They ignore H when choosing weights; pass ``H`` only to get the exact ``row_error``.
"""

from __future__ import annotations

import torch

from automl_compress.solvers.checks import (
    check_bits,
    check_hessian,
    check_n_m,
    check_sparsity,
    check_weight,
)
from automl_compress.solvers.hessian import row_errors
from automl_compress.solvers.quantizer import GridSpec, fit_grid
from automl_compress.solvers.result import SolveResult


def _errors(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor | None) -> torch.Tensor | None:
    if H is None:
        return None
    check_hessian(H, W.shape[1])
    return row_errors(W, W_hat, H)


def rtn_quantize(
    W: torch.Tensor, bits: int = 4, *, H: torch.Tensor | None = None, grid: GridSpec | None = None
) -> SolveResult:
    """Round every weight to the nearest point of its row's grid.

    Args:
        W: (rows, cols) weights.
        bits: 2..8, or 0 to remove every row.
        H: optional (cols, cols) Hessian, only used to report ``row_error``.
        grid: how the per-row grid is fitted (default: symmetric, MSE shrink search).
    """
    check_weight(W)
    check_bits(bits)
    if bits == 0:
        W_hat = torch.zeros_like(W)
        return SolveResult(W_hat, _errors(W, W_hat, H), bits=0, info={"method": "rtn"})
    g = fit_grid(W, bits, grid)
    W_hat = g.quantize(W)
    return SolveResult(
        W_hat, _errors(W, W_hat, H), scale=g.scale, zero=g.zero, bits=bits, info={"method": "rtn"}
    )


def magnitude_prune(
    W: torch.Tensor,
    sparsity: float = 0.5,
    *,
    n_m: tuple[int, int] | None = None,
    per_row: bool = False,
    H: torch.Tensor | None = None,
) -> SolveResult:
    """Zero the smallest-magnitude weights; the kept ones are left unchanged.

    Args:
        W: (rows, cols) weights.
        sparsity: fraction of zeros, in [0, 1); exactly ``round(sparsity · numel)`` weights are
            removed (per layer, or per row with ``per_row``). Ignored when ``n_m`` is given.
        n_m: keep the N largest of every M consecutive weights of a row.
        per_row: the same count in every row instead of one layer-wide threshold.
        H: optional Hessian, only used to report ``row_error``.
    """
    check_weight(W)
    rows, cols = W.shape
    mag = W.abs()
    if n_m is not None:
        n, m = check_n_m(n_m, cols)
        groups = mag.reshape(rows, cols // m, m)
        keep_idx = groups.topk(n, dim=2).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, keep_idx, True)
        mask = mask.reshape(rows, cols)
    else:
        check_sparsity(sparsity)
        mask = torch.ones_like(W, dtype=torch.bool)
        if per_row:
            k = int(round(sparsity * cols))
            if k:
                drop = mag.topk(k, dim=1, largest=False).indices
                mask.scatter_(1, drop, False)
        else:
            k = int(round(sparsity * W.numel()))
            if k:
                drop = mag.flatten().topk(k, largest=False).indices
                mask.view(-1)[drop] = False
    W_hat = torch.where(mask, W, torch.zeros_like(W))
    return SolveResult(W_hat, _errors(W, W_hat, H), mask=mask, info={"method": "magnitude"})
