"""The fixed-order column sweep that GPTQ, SparseGPT and order replay share (docs/solvers.md §6).

When every row fixes its columns in one order, the chain of inverses of the still-free columns is
encoded in the upper Cholesky factor U of H⁻¹ in that order (``H⁻¹ = UᵀU``): fixing column i of
row w to a target t costs ``(w_i − t)² / (2 U_ii²)`` and the optimal correction of the later
columns is ``w[i:] −= ((w_i − t) / U_ii) · U[i, i:]``. Inside a block of B columns the correction
is applied column by column; the columns after the block get one GEMM per block (lazy batching).
U may be shared by all rows (d, d) or be one factor per row (R, d, d).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: ``target(i, W1, j)``: the (R,) value column i (= block column j of the block view W1) takes.
Target = Callable[[int, torch.Tensor, int], torch.Tensor]


def column_sweep(W: torch.Tensor, U: torch.Tensor, target: Target, block_size: int) -> torch.Tensor:
    """Fix every column of W in order, compensating the later columns (W is modified in place).

    :param W: (R, d) working weights, columns already in the sweep order.
    :param U: (d, d) or (R, d, d) upper Cholesky factor of the (damped) H⁻¹ in the same order.
    :param target: gives the value each column must take, from the current block weights (it may
        read W1[:, j:] to choose, e.g. SparseGPT's masks).
    :param block_size: lazy block width B (the result does not depend on it up to rounding).
    :returns: (R, d) the targets, which are also the final values of W.
    """
    R, d = W.shape
    Q = torch.empty_like(W)
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        W1 = W[:, i1:i2]  # a view: the updates land in W
        E1 = torch.empty((R, i2 - i1), dtype=W.dtype, device=W.device)
        for j in range(i2 - i1):
            i = i1 + j
            q = target(i, W1, j)
            Q[:, i] = q
            u = U[..., i, i:i2]  # (B') or (R, B')
            e = (W1[:, j] - q) / U[..., i, i]
            W1[:, j:] -= e[:, None] * u
            E1[:, j] = e
        if i2 < d:
            if U.dim() == 3:
                W[:, i2:] -= torch.bmm(E1[:, None, :], U[:, i1:i2, i2:]).squeeze(1)
            else:
                W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q
