"""OBQ, the Optimal Brain Quantizer: greedy per row, exact inverse downdates (ALGORITHMS.md §1.7).

For one row w with current inverse Hinv over the free coordinates, every free weight j is scored by
the loss of fixing it to its grid value, ``(w_j − q(w_j))² / [Hinv]_jj``; the best one p is fixed
(``w −= ((w_p − q_p) / [Hinv]_pp) · Hinv[:, p]``, which lands w_p exactly on q_p and optimally
corrects the free weights) and Hinv is downdated (``Hinv −= Hinv[:, p] Hinv[p, :] / [Hinv]_pp``).
The outlier rule (§1.8) fixes first any free weight that compensation pushed outside the clipped
grid. Rows run in batches with no host synchronisation inside the step loop.

Pre-pruned rows (``mask``): masked coordinates are eliminated first with target 0 (exact downdates,
no per-row re-inversion), then the survivors are quantized greedily.
"""

from __future__ import annotations

import torch

from automl_compress.errors import ShapeMismatchError
from automl_compress.solvers.checks import check_bits, check_hessian, check_weight
from automl_compress.solvers.gptq import solve_dtype
from automl_compress.solvers.hessian import (
    DEFAULT_DAMP,
    inverse_hessian,
    prepare_hessian,
    row_errors,
)
from automl_compress.solvers.quantizer import GridSpec, fit_grid
from automl_compress.solvers.result import SolveResult


def auto_row_batch(rows: int, cols: int, device: torch.device, itemsize: int) -> int:
    """Rows per batch so the stacked (R, cols, cols) inverses fit a memory budget."""
    per_row = 3 * cols * cols * itemsize
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(0.5 * free)
    else:
        budget = 1 << 30
    return int(max(1, min(rows, budget // max(per_row, 1))))


class LazyInverse:
    """Stacked per-row inverses with rank-1 downdates applied lazily (ALGORITHMS.md §1.2).

    The greedy choice needs only the diagonal (kept current in O(d) per step) and the pivot column,
    which is the stored column minus the pending factors' contributions (O(d·k)). Every ``rank``
    steps the pending factors are flushed into the stored matrices with one batched rank-``rank``
    GEMM. ``rank=1`` is the plain eager downdate; every rank gives the same greedy result.
    """

    def __init__(self, Hinv: torch.Tensor, rank: int) -> None:
        if rank < 1:
            raise ValueError(f"lazy rank must be >= 1, found {rank}")
        R, d, _ = Hinv.shape
        self.base = Hinv
        self.rank = rank
        self.U = Hinv.new_zeros(R, rank, d)
        self.k = 0
        self.diag = torch.diagonal(Hinv, dim1=1, dim2=2).clone()
        self.rows = torch.arange(R, device=Hinv.device)

    def column(self, p: torch.Tensor) -> torch.Tensor:
        """(R, d) current column ``p[r]`` of every row's inverse."""
        col = self.base[self.rows, :, p]
        if self.k:
            U = self.U[:, : self.k]
            col = col - torch.einsum("rs,rsd->rd", U[self.rows, :, p], U)
        return col

    def downdate(self, u: torch.Tensor) -> None:
        """Queue ``Hinv −= u uᵀ`` for every row (u: (R, d))."""
        self.U[:, self.k] = u
        self.diag -= u * u
        self.k += 1
        if self.k == self.rank:
            self.base.baddbmm_(self.U.transpose(1, 2), self.U, alpha=-1.0)
            self.U.zero_()
            self.k = 0


def obs_fix(
    w: torch.Tensor,
    inv: LazyInverse,
    free: torch.Tensor,
    p: torch.Tensor,
    target: torch.Tensor,
    active: torch.Tensor,
) -> torch.Tensor:
    """Fix coordinate ``p[r]`` of every active row r to ``target[r]`` (one OBS step, in place).

    Args:
        w: (R, d) current weights.
        inv: the rows' current inverses over the free coordinates (fixed ones are ~0).
        free: (R, d) bool, True for coordinates not yet fixed.
        p: (R,) chosen coordinate per row.
        target: (R,) value the coordinate must take.
        active: (R,) bool; inactive rows are left unchanged.

    Returns:
        (R,) loss of the step, ``(w_p − t)² / (2 [Hinv]_pp)`` (0 for inactive rows).
    """
    ar = inv.rows
    col = torch.where(free, inv.column(p), torch.zeros_like(w))  # fixed coordinates stay fixed
    d = col[ar, p]
    d = torch.where(active & (d > 0), d, torch.ones_like(d))
    r = torch.where(active, w[ar, p] - target, torch.zeros_like(target))
    w -= (r / d)[:, None] * col
    w[ar, p] = torch.where(active, target, w[ar, p])
    inv.downdate(col / torch.sqrt(d)[:, None] * active.to(col.dtype)[:, None])
    free[ar, p] = free[ar, p] & ~active
    return r * r / (2 * d)


def _obq_batch(
    w: torch.Tensor,
    Hinv: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    maxq: int,
    keep: torch.Tensor | None,
    outlier_rule: bool,
    lazy_rank: int = 1,
) -> torch.Tensor:
    """Greedy OBQ on one batch of rows (in place); returns the (R,) summed step losses."""
    R, d = w.shape
    inv = LazyInverse(Hinv, lazy_rank)
    free = torch.ones_like(w, dtype=torch.bool)
    loss = torch.zeros(R, dtype=w.dtype, device=w.device)
    inf = torch.tensor(float("inf"), dtype=w.dtype, device=w.device)
    if keep is not None:
        pruned = ~keep
        n_pruned = pruned.sum(1)
        for k in range(int(n_pruned.max()) if pruned.numel() else 0):
            # each row eliminates its next still-free pruned coordinate (target 0)
            cand = pruned & free
            p = torch.argmax(cand.to(torch.int8), dim=1)
            active = n_pruned > k
            loss += obs_fix(w, inv, free, p, torch.zeros_like(loss), active)
    s = scale[:, None]
    z = zero[:, None]
    steps = d if keep is None else int(keep.sum(1).max())
    for _ in range(steps):
        q = s * (torch.clamp(torch.round(w / s) + z, 0, maxq) - z)
        err2 = (w - q) ** 2
        score = torch.where(free, err2 / torch.clamp(inv.diag, min=1e-30), inf)
        p = torch.argmin(score, dim=1)
        if outlier_rule:
            out = torch.where(free & (err2 > s * s / 4), err2, -inf)
            best_out, p_out = out.max(dim=1)
            p = torch.where(best_out > -inf, p_out, p)
        active = free.any(dim=1)
        loss += obs_fix(w, inv, free, p, q[inv.rows, p], active)
    return loss


def obq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int = 4,
    *,
    mask: torch.Tensor | None = None,
    grid: GridSpec | None = None,
    damp: float = DEFAULT_DAMP,
    outlier_rule: bool = True,
    row_batch: int | None = None,
    dtype: torch.dtype | None = None,
    lazy_rank: int = 32,
) -> SolveResult:
    """Quantize W with OBQ (exact greedy per row).

    Args:
        W: (rows, cols) weights.
        H: (cols, cols) Hessian ``2·XᵀX/n``.
        bits: 2..8, or 0 to remove every row.
        mask: (rows, cols) bool, False where the weight is pruned (fixed at 0 before quantizing).
        grid: how the per-row grid is fitted (once, up front, on the original W).
        damp: relative damping of H for the solve.
        outlier_rule: fix weights pushed outside the clipped grid first (§1.8).
        row_batch: rows per batch (default: sized to the device memory).
        dtype: working precision (default float64 on CPU, float32 on CUDA).
        lazy_rank: downdates queued before one batched GEMM applies them (1 = eager); the
            greedy result does not depend on it.

    Returns:
        SolveResult with ``row_error`` under the undamped H; ``info["step_loss_sum"]`` holds the
        per-row sum of greedy step losses (the error under the damped H).
    """
    check_weight(W)
    rows, cols = W.shape
    check_hessian(H, cols)
    check_bits(bits)
    if mask is not None and mask.shape != W.shape:
        raise ShapeMismatchError(
            f"mask must have W's shape {tuple(W.shape)}, found {tuple(mask.shape)}"
        )
    if bits == 0:
        W_hat = torch.zeros_like(W)
        return SolveResult(W_hat, row_errors(W, W_hat, H), bits=0, info={"method": "obq"})
    dt = solve_dtype(W, dtype)
    g = fit_grid(W, bits, grid)
    prep = prepare_hessian(H.to(W.device), damp)
    Hinv = inverse_hessian(prep).to(dt)
    Wk = W.to(dt).clone()
    Wk[:, prep.dead] = 0.0
    keep = None if mask is None else mask.to(torch.bool)
    R = row_batch or auto_row_batch(rows, cols, W.device, torch.finfo(dt).bits // 8)
    losses = torch.zeros(rows, dtype=dt, device=W.device)
    for r1 in range(0, rows, R):
        r2 = min(r1 + R, rows)
        Hb = Hinv.expand(r2 - r1, cols, cols).clone()
        kb = None if keep is None else keep[r1:r2]
        losses[r1:r2] = _obq_batch(
            Wk[r1:r2],
            Hb,
            g.scale[r1:r2].to(dt),
            g.zero[r1:r2].to(dt),
            g.maxq,
            kb,
            outlier_rule,
            lazy_rank,
        )
    W_hat = g.quantize(Wk).to(W.dtype)
    if keep is not None:
        W_hat = torch.where(keep, W_hat, torch.zeros_like(W_hat))
    return SolveResult(
        W_hat,
        row_errors(W, W_hat, H),
        mask=keep,
        scale=g.scale,
        zero=g.zero,
        bits=bits,
        info={"method": "obq", "step_loss_sum": losses.to(torch.float64)},
    )
