"""Fast mode: OBQ's greedy on a sliding window of columns, then 1-opt (docs/solvers.md §7).

GPTQ fixes the columns in one shared order, so one Cholesky factor U of H⁻¹ (``H⁻¹ = UᵀU``)
serves every row; OBQ lets every row choose its own order, at one (cols × cols) inverse per row.
The fast mode lets the columns enter in the shared order, B at a time, into a window of at most
``carry + B`` slots per row. Each row runs OBQ's greedy on its window only, with every column
not yet entered free and optimised continuously; when a row holds at most ``carry`` unfixed
weights, the next B columns enter. So a row may defer up to ``carry`` hard weights for as long
as it likes, and the hardest end up fixed last, as in OBQ, while a step costs
O((carry + B)²) per row instead of OBQ's O(cols²). carry = 0 is GPTQ's blocks with OBQ inside
each (B = 1: GPTQ); carry + B >= cols is OBQ.

Everything the window needs is in U. Over the entered columns A (fixed or held) and a block N
entering, with the later columns optimised out: the held weights' inverse M does not change;
the new columns' optimum given A's values is ``y_N = x_N − (x − v)_A · T`` with
``T = U_AA⁻¹ U_AN`` (``x`` the weights, ``v`` the fixed codes and the held weights' current
values); and the inverse over held ∪ N is M bordered by ``M·T_S`` and ``U_NNᵀU_NN + T_SᵀM T_S``
(T_S: T's rows at the held columns), a Schur-complement identity.

1-opt then moves single weights by one grid step while that lowers the row's true error
``0.5·eHeᵀ`` (e = ŵ − w): moving coordinate j by δ changes it by ``Δ = δ·(eH)_j + δ²·H_jj / 2``.
Each sweep applies, in every row still improving, that row's best improving move.
"""

from __future__ import annotations

import torch

from automl_compress.errors import ShapeMismatchError
from automl_compress.solvers.checks import check_bits, check_hessian, check_weight
from automl_compress.solvers.gptq import column_order, gptq_quantize
from automl_compress.solvers.hessian import (
    DEFAULT_DAMP,
    InverseFactors,
    permuted_upper,
    prepare_hessian,
    row_errors,
)
from automl_compress.solvers.lazy_inverse import LazyInverse
from automl_compress.solvers.numerics import row_argmax, solve_dtype
from automl_compress.solvers.obq import greedy_quantize
from automl_compress.solvers.quantizer import GridSpec, fit_grid
from automl_compress.solvers.result import SolveResult

#: Columns entering the window at once, and unfixed weights a row carries past a block's end
#: (docs/solvers.md §9.1: 0–20 % over the block greedy's time at 4–6 points less error).
DEFAULT_BLOCK = 16
DEFAULT_CARRY = 16


def one_opt(
    W: torch.Tensor,
    W_hat: torch.Tensor,
    H: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    *,
    mask: torch.Tensor | None = None,
    max_sweeps: int | None = None,
) -> torch.Tensor:
    """Polish a quantized W_hat by improving ±1-grid-step moves (best move per row per sweep).

    In grid units (e = ŵ/s − w/s, g = eH, the error divided by s²) the move δ = ±1 of weight j
    changes the error by ``±g_j + H_jj/2``, so a row's best move is the j that maximises
    ``|g_j| − H_jj/2`` in the direction ``−sign(g_j)`` (the other direction only raises it). A
    row with no improving move is finished (rows are independent), so every sweep works on the
    rows still improving only.

    Args:
        W: (rows, cols) original weights.
        W_hat: (rows, cols) quantized weights on the grid given by scale/zero/bits.
        H: (cols, cols) undamped Hessian (the objective).
        scale: (rows,) step of the per-row grid.
        zero: (rows,) zero point of the per-row grid.
        bits: bit-width of the per-row grid.
        mask: (rows, cols) bool; False entries stay at 0.
        max_sweeps: cap on sweeps (default 4·cols).

    Returns:
        The polished weights, same dtype as W_hat; every row's error is <= its input error.
    """
    dt = torch.float64 if not W.is_cuda else torch.float32
    Hd = H.to(device=W.device, dtype=dt)
    s = scale.to(dt)[:, None]
    z = zero.to(dt)[:, None]
    maxq = 2**bits - 1
    out = torch.round(W_hat.to(dt) / s) + z  # codes of every row
    half = torch.diagonal(Hd)[None, :] / 2
    left = torch.arange(W.shape[0], device=W.device)  # rows still improving
    codes = out.clone()
    G = (codes - z - W.to(dt) / s) @ Hd
    frozen = None if mask is None else ~mask.to(torch.bool)
    for _ in range(max_sweeps or 4 * W.shape[1]):
        gain = G.abs().sub_(half)
        blocked = torch.where(G > 0, codes <= 0, codes >= maxq)
        if frozen is not None:
            blocked |= frozen
        gain.masked_fill_(blocked, -float("inf"))
        j = row_argmax(gain)
        best = gain.gather(1, j[:, None]).squeeze(1)
        improve = best > 1e-12 * G.abs().sum(1)
        if not bool(improve.all()):  # finished rows leave the sweep
            done = ~improve
            out[left[done]] = codes[done]
            if not bool(improve.any()):
                return (s * (out - z)).to(W_hat.dtype)
            keep = improve.nonzero().squeeze(1)
            left, codes, G, j = left[keep], codes[keep], G[keep], j[keep]
            if frozen is not None:
                frozen = frozen[keep]
        ar = torch.arange(len(left), device=W.device)
        step = -torch.sign(G[ar, j])
        codes[ar, j] += step
        G.addcmul_(step[:, None], Hd[j])
    out[left] = codes
    return (s * (out - z)).to(W_hat.dtype)


def polish(W: torch.Tensor, H: torch.Tensor, res: SolveResult) -> SolveResult:
    """``res`` with :func:`one_opt` applied to its weights (on its mask), ``row_error`` anew.

    Never raises a row's error; 0-bit results are returned as they are.
    """
    if res.bits == 0 or res.scale is None or res.zero is None:
        return res
    W_hat = one_opt(W, res.weight, H, res.scale, res.zero, res.bits, mask=res.mask)
    return SolveResult(W_hat, row_errors(W, W_hat, H), mask=res.mask, scale=res.scale,
                       zero=res.zero, bits=res.bits, info={**res.info, "one_opt": True})


def fast_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int = 4,
    *,
    block_size: int = DEFAULT_BLOCK,
    carry: int = DEFAULT_CARRY,
    act_order: bool = True,
    one_opt_polish: bool = True,
    grid: GridSpec | None = None,
    damp: float = DEFAULT_DAMP,
    mask: torch.Tensor | None = None,
    row_batch: int | None = None,
    dtype: torch.dtype | None = None,
    lazy_rank: int = 16,
    factors: InverseFactors | None = None,
) -> SolveResult:
    """Quantize W by OBQ's greedy on a sliding window of columns, then 1-opt.

    Args:
        W: (rows, cols) weights.
        H: (cols, cols) Hessian ``2·XᵀX/n``.
        bits: 2..8, or 0 to remove every row.
        block_size: columns B that enter the window at once.
        carry: unfixed weights a row carries into the next block (0: blocks of B columns one
            after the other; B + carry >= cols: OBQ with GPTQ's damping).
        act_order: columns enter by decreasing diag H (else in the natural order).
        one_opt_polish: run :func:`one_opt` on the result.
        grid: how the per-row grid is fitted, as for :func:`gptq_quantize`.
        damp: relative damping of H, as for :func:`gptq_quantize`.
        mask: (rows, cols) bool, False where the weight is pruned (it ends exactly 0).
        row_batch: rows per sweep (rows are independent; default all at once).
        dtype: working precision, as for :func:`gptq_quantize`.
        lazy_rank: pending downdates per flush (the result does not depend on it).
        factors: H's factors shared with other solves of the same H (the result does not
            depend on it).

    Returns:
        SolveResult with ``row_error`` under the undamped H.
    """
    check_weight(W)
    rows, cols = W.shape
    check_hessian(H, cols)
    check_bits(bits)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, found {block_size}")
    if carry < 0:
        raise ValueError(f"carry must be >= 0, found {carry}")
    if mask is not None and mask.shape != W.shape:
        raise ShapeMismatchError(
            f"mask must have W's shape {tuple(W.shape)}, found {tuple(mask.shape)}"
        )
    if bits == 0:
        return gptq_quantize(W, H, 0)
    dt = solve_dtype(W, dtype)
    g = fit_grid(W, bits, grid)
    H = H.to(W.device)
    prep = factors.prepared(H, damp) if factors is not None else prepare_hessian(H, damp)
    perm = column_order(prep.H, act_order)
    U = factors.upper(H, damp, perm) if factors is not None else permuted_upper(prep, perm)
    window = _Window(U, block_size, carry, dt)
    s = g.scale.to(dt)[:, None]
    X = (W.to(dt) / s).masked_fill(prep.dead[None, :], 0.0)[:, perm]  # grid units, sweep order
    lo, hi = -g.zero.to(dt)[:, None], g.maxq - g.zero.to(dt)[:, None]
    keep = None if mask is None else mask.to(device=W.device, dtype=torch.bool)
    prune = None if keep is None else ~keep[:, perm]
    codes = torch.empty_like(X)
    R = row_batch or max(rows, 1)
    for r1 in range(0, rows, R):
        b = slice(r1, min(r1 + R, rows))
        codes[b] = window.quantize(X[b], lo[b], hi[b], None if prune is None else prune[b],
                                   lazy_rank)
    W_hat = (s * codes[:, torch.argsort(perm)]).to(W.dtype)
    if keep is not None:
        W_hat = W_hat.masked_fill(~keep, 0.0)
    if one_opt_polish:
        W_hat = one_opt(W, W_hat, H, g.scale, g.zero, bits, mask=keep)
    return SolveResult(
        W_hat,
        row_errors(W, W_hat, H),
        mask=keep,
        scale=g.scale,
        zero=g.zero,
        bits=bits,
        info={"method": "fast", "block_size": block_size, "carry": carry,
              "act_order": act_order},
    )


class _Window:
    """OBQ's greedy on a sliding window of the shared column order (docs/solvers.md §7).

    Args:
        U: (cols, cols) upper factor of H⁻¹ in the sweep order (``H⁻¹ = UᵀU``), float64.
        block: columns B entering at once.
        carry: unfixed weights a row may hold when the next block enters.
        dt: working precision.
    """

    def __init__(self, U: torch.Tensor, block: int, carry: int, dt: torch.dtype) -> None:
        cols = U.shape[0]
        self.cols, self.block, self.carry, self.dt = cols, block, carry, dt
        self.slots = min(block + carry, cols)
        self.U = U
        # V = U⁻¹ (upper): the later columns' optimum given the entered ones' values reads
        # y_N = x_N − (x − v)_A · T_AN with T_AN = U_AA⁻¹ U_AN = −V_AN U_NN
        self.V = torch.linalg.solve_triangular(U, torch.eye(cols, dtype=U.dtype, device=U.device),
                                               upper=True)

    def quantize(self, X: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 prune: torch.Tensor | None, lazy_rank: int) -> torch.Tensor:
        """(R, cols) codes of the rows X (grid units, sweep order)."""
        R, cols = X.shape
        n, dev, dt = self.slots, X.device, self.dt
        v = torch.zeros((R, cols + 1), dtype=dt, device=dev)  # entered columns' values (+ sink)
        col = torch.full((R, n), cols, dtype=torch.long, device=dev)  # slot -> column
        inv = LazyInverse(torch.zeros((R, n), dtype=dt, device=dev),
                          torch.zeros((R, n, n), dtype=dt, device=dev), lazy_rank, False)
        inv.diag.fill_(-1.0)
        pad = None if prune is None else torch.cat(
            [prune, torch.zeros((R, 1), dtype=torch.bool, device=dev)], dim=1)
        a = held = 0  # columns entered; entered columns not yet fixed (the same in every row)
        while held or a < cols:
            if a < cols and held <= self.carry:
                b = min(a + self.block, cols)
                self._enter(inv, X, v, col, a, b)
                held += b - a
                a = b
                continue
            steps = held - self.carry if a < cols else held
            greedy_quantize(inv, lo, hi, steps, True, None if pad is None else pad.gather(1, col))
            held -= steps
        v.scatter_(1, col, inv.w)
        return torch.clamp(v[:, :cols].round(), lo, hi)

    def _enter(self, inv: LazyInverse, X: torch.Tensor, v: torch.Tensor, col: torch.Tensor,
               a: int, b: int) -> None:
        """Columns a..b−1 enter every row's window in the slots its fixed weights left."""
        R, n = col.shape
        nb = b - a
        inv.flush()
        v.scatter_(1, col, inv.w)  # the fixed weights' codes, the held ones' current values
        held = inv.diag > 0
        U_NN = self.U[a:b, a:b]
        T = torch.cat([-(self.V[:a, a:b] @ U_NN).to(self.dt),
                       torch.zeros((1, nb), dtype=self.dt, device=X.device)])  # row a: nothing
        y = X[:, a:b] - (X[:, :a] - v[:, :a]) @ T[:a]
        # the new columns' rows and columns of the inverse over held ∪ new, per row:
        # [M, −M·Q·R⁻¹; ·, R⁻¹ + R⁻¹QᵀMQR⁻¹] with M the held weights' inverse and Q·R⁻¹ = −T
        M = inv.base  # the fixed slots' rows and columns hold rounding residue: zero them
        keep = held.to(self.dt)
        M.mul_(keep[:, :, None]).mul_(keep[:, None, :])  # (a broadcast masked_fill is 10× slower)
        TS = T.index_select(0, col.masked_fill(~held, a).view(-1)).view(R, n, nb)
        side = torch.bmm(M, TS)
        corner = torch.bmm(TS.transpose(1, 2), side).add_((U_NN.mT @ U_NN).to(self.dt))
        free = torch.argsort(held.to(torch.int8), dim=1, stable=True)[:, :nb]
        inv.refill(free, y, side, corner)
        col.scatter_(1, free, torch.arange(a, b, device=X.device).expand(R, nb))
