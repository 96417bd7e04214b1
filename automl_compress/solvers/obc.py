"""Joint OBC: prune with ExactOBS, then quantize the survivors with OBQ (docs/solvers.md §3).

The mask comes from the exact greedy pruning pass; OBQ then fixes the pruned coordinates at 0 (0 is
on the grid, so they cost nothing beyond the pruning) and quantizes the kept weights greedily with
the inverse restricted to each row's support. The reported error is against the original dense W.
"""

from __future__ import annotations

import torch

from automl_compress.solvers.exact_obs import exact_obs_prune
from automl_compress.solvers.gptq import gptq_quantize
from automl_compress.solvers.hessian import DEFAULT_DAMP
from automl_compress.solvers.obq import obq_quantize
from automl_compress.solvers.quantizer import GridSpec
from automl_compress.solvers.result import SolveResult, on_mask


def obc_compress(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int = 4,
    *,
    n_m: tuple[int, int] | None = None,
    sparsity: float | None = None,
    block: int | None = None,
    allocation: str = "global",
    kernel_area: int = 1,
    quant: str = "obq",
    grid: GridSpec | None = None,
    damp: float = DEFAULT_DAMP,
    row_batch: int | None = None,
    dtype: torch.dtype | None = None,
) -> SolveResult:
    """Prune and quantize one layer.

    Args:
        W: (rows, cols) weights.
        H: (cols, cols) Hessian ``2·XᵀX/n``.
        bits: 2..8 for the kept weights, or 0 to remove every row.
        n_m: N:M pattern (N kept of every M); or
        sparsity: unstructured layer sparsity in [0, 1) (with ``block``: block sparsity).
        block: prune blocks of this many consecutive (channel-major) columns.
        allocation: per-row zero counts, 'global' (exact for the layer) or 'uniform' (every row
            the same count, so every row's storage cost is the same).
        kernel_area: conv kernel area (N:M groups and blocks run along input channels).
        quant: 'obq' (exact greedy) or 'gptq' (fixed order) for the quantization stage.
        grid: how the per-row grid is fitted; as for :func:`obq_quantize`.
        damp: relative damping of H for the solve; as for :func:`obq_quantize`.
        row_batch: rows per batch; as for :func:`obq_quantize`.
        dtype: working precision; as for :func:`obq_quantize`.

    Returns:
        SolveResult with ``mask``, the grid, and ``row_error`` against the dense W.
    """
    if quant not in ("obq", "gptq"):
        raise ValueError(f"quant must be 'obq' or 'gptq', found {quant!r}")
    if n_m is None and sparsity is None:
        if quant == "gptq":
            return gptq_quantize(W, H, bits, grid=grid, damp=damp, row_batch=row_batch,
                                 dtype=dtype)
        return obq_quantize(W, H, bits, grid=grid, damp=damp, row_batch=row_batch, dtype=dtype)
    pruned = exact_obs_prune(
        W,
        H,
        sparsity=0.0 if sparsity is None else sparsity,
        n_m=n_m,
        block=block,
        allocation=allocation,
        kernel_area=kernel_area,
        damp=damp,
        row_batch=row_batch,
        dtype=dtype,
    )
    if quant == "gptq":
        res = gptq_quantize(pruned.weight, H, bits, mask=pruned.mask, grid=grid, damp=damp,
                            row_batch=row_batch, dtype=dtype)
    else:
        res = obq_quantize(pruned.weight, H, bits, mask=pruned.mask, grid=grid, damp=damp,
                           row_batch=row_batch, dtype=dtype)
    return on_mask(W, H, pruned, res, "obc")
