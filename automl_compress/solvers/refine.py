"""Fast mode: OBQ's greedy inside column blocks, GPTQ across them, then 1-opt (docs/solvers.md §7).

GPTQ fixes the columns in one shared order, so one Cholesky factor U of H⁻¹ (``H⁻¹ = UᵀU``)
serves every row; OBQ lets every row choose its own order, at one (cols × cols) inverse per row.
The fast mode splits the shared order into blocks of B columns. When a block starts, every earlier
column is fixed and the free set F is the block and every later column, whose inverse restricted
to the block is ``U_BBᵀ U_BB`` (shared). Inside the block each row runs OBQ's greedy on that B × B
inverse (its own order, the later columns' correction deferred); after it, the later columns take
the correction of the whole block at once, which does not depend on the order inside the block:
with the block's residuals ``r = x_B − q_B``, ``E = r · U_BB⁻¹`` and ``x_L −= E · U_BL`` (GPTQ's
lazy batch, docs/solvers.md §6). B = cols is OBQ; B = 1 is GPTQ.

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

#: Columns per block (64: 2.5–3.2× GPTQ's time from 256 to 1536 columns, docs/solvers.md §9.1).
DEFAULT_BLOCK = 64


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
    """Quantize W by OBQ's greedy inside blocks of columns and GPTQ across them, then 1-opt.

    Args:
        W: (rows, cols) weights.
        H: (cols, cols) Hessian ``2·XᵀX/n``.
        bits: 2..8, or 0 to remove every row.
        block_size: columns per block B (B >= cols is OBQ with GPTQ's damping).
        act_order: blocks follow decreasing diag H (else the natural order).
        one_opt_polish: run :func:`one_opt` on the result.
        grid: how the per-row grid is fitted, as for :func:`gptq_quantize`.
        damp: relative damping of H, as for :func:`gptq_quantize`.
        mask: (rows, cols) bool, False where the weight is pruned (it ends exactly 0).
        row_batch: rows per sweep (rows are independent; default all at once).
        dtype: working precision, as for :func:`gptq_quantize`.
        lazy_rank: pending downdates per flush inside a block (the result does not depend on it).
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
    s = g.scale.to(dt)[:, None]
    X = (W.to(dt) / s).masked_fill(prep.dead[None, :], 0.0)[:, perm]  # grid units, sweep order
    lo, hi = -g.zero.to(dt)[:, None], g.maxq - g.zero.to(dt)[:, None]
    keep = None if mask is None else mask.to(device=W.device, dtype=torch.bool)
    prune = None if keep is None else ~keep[:, perm]
    Ud = U.to(dt)
    codes = torch.empty_like(X)
    R = row_batch or max(rows, 1)
    for r1 in range(0, rows, R):
        b = slice(r1, min(r1 + R, rows))
        Xb = X[b]
        for i1 in range(0, cols, block_size):
            i2 = min(i1 + block_size, cols)
            U_BB = U[i1:i2, i1:i2]
            # the free set is this block and every later column: its inverse on the block
            inv = LazyInverse(Xb[:, i1:i2], (U_BB.mT @ U_BB).to(dt), min(lazy_rank, i2 - i1),
                              False, steps=i2 - i1)
            greedy_quantize(inv, lo[b], hi[b], i2 - i1, True,
                            None if prune is None else prune[b, i1:i2])
            c = torch.clamp(inv.result().round(), lo[b], hi[b])
            codes[b, i1:i2] = c
            if i2 < cols:  # the later columns' correction does not depend on the block's order
                E = torch.linalg.solve_triangular(Ud[i1:i2, i1:i2], Xb[:, i1:i2] - c,
                                                  upper=True, left=False)
                Xb[:, i2:] -= E @ Ud[i1:i2, i2:]
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
        info={"method": "fast", "block_size": block_size, "act_order": act_order},
    )
