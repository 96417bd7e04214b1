"""OBQ, the Optimal Brain Quantizer: greedy per row, exact inverse downdates.

Frantar, Singh, Alistarh, "Optimal Brain Compression", NeurIPS 2022 (arXiv 2208.11580); the maths
is in docs/solvers.md §1–3. For one row w with inverse H⁻¹ over its free coordinates, every free
weight j is scored by the loss of fixing it to its grid value, ``(w_j − q(w_j))² / [H⁻¹]_jj``; the
best one is fixed by an OBS step (:class:`~automl_compress.solvers.lazy_inverse.LazyInverse`),
until every weight lies on the grid. The outlier rule fixes first any free weight that
compensation pushed outside the clipped grid (|w − q(w)| > Δ/2).

The working weights are kept in grid units (``x = w / s``, per row), so a code is
``clamp(round(x), −z, maxq − z)`` and the outlier test is ``(x − code)² > 1/4``.

Pre-pruned rows (``mask``) are solved on their kept coordinates only: each row starts from
``(H_SS)⁻¹`` over its support S, which is exactly the inverse the greedy would reach after
eliminating the pruned coordinates, at a fraction of the cost.

Example (2×2, 2 bits)::

    >>> import torch
    >>> W = torch.tensor([[0.30, -0.70], [0.90, 0.10]], dtype=torch.float64)
    >>> H = torch.tensor([[2.0, 0.6], [0.6, 1.0]], dtype=torch.float64)
    >>> res = obq_quantize(W, H, bits=2, damp=0.0)
    >>> res.codes().tolist()
    [[3, 0], [3, 2]]
"""

from __future__ import annotations

import torch

from automl_compress.errors import ShapeMismatchError
from automl_compress.solvers.checks import check_bits, check_hessian, check_weight
from automl_compress.solvers.hessian import (
    DEFAULT_DAMP,
    inverse_hessian,
    prepare_hessian,
    row_errors,
    support_inverse,
)
from automl_compress.solvers.lazy_inverse import DEFAULT_LAZY_RANK, LazyInverse
from automl_compress.solvers.numerics import auto_row_batch, row_argmax, solve_dtype
from automl_compress.solvers.quantizer import GridSpec, fit_grid
from automl_compress.solvers.result import SolveResult


def greedy_quantize(
    inv: LazyInverse,
    lo: torch.Tensor,
    hi: torch.Tensor,
    steps: int,
    outlier_rule: bool,
    prune: torch.Tensor | None = None,
) -> None:
    """Run ``steps`` OBQ steps on every row of ``inv`` (weights in grid units, in place).

    :param inv: the rows' working weights and inverses.
    :param lo: (R, 1) lowest code (−zero point); ``hi``: (R, 1) highest code.
    :param steps: greedy steps (the number of free coordinates of the widest row).
    :param outlier_rule: fix the worst weight outside the clipped grid first.
    :param prune: (R, n) slots to fix at 0 before any other (needs ``inv`` without compaction,
        so that slots stay columns), or None.
    """
    for _ in range(steps):
        x = inv.w
        code = x.clamp(lo, hi).round_()
        if prune is not None:
            code.masked_fill_(prune, 0.0)
        err2 = torch.sub(x, code).square_()
        # argmax over free j of [H⁻¹]_jj/err²; fixed slots carry diag < 0, so they score < 0
        score = torch.div(inv.diag, err2)
        if prune is not None:
            score.masked_fill_(prune & (inv.diag > 0), float("inf"))
        p = row_argmax(score)
        if outlier_rule:
            out = err2 if prune is None else err2.masked_fill(prune, 0.0)
            p_out = row_argmax(out)
            worst = out.gather(1, p_out[:, None]).squeeze(1)
            take = worst > 0.25
            if prune is not None:  # pruned slots still open come first
                take &= score.gather(1, p[:, None]).squeeze(1) != float("inf")
            p = torch.where(take, p_out, p)
        inv.eliminate(p, code.gather(1, p[:, None]))


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
    lazy_rank: int = DEFAULT_LAZY_RANK,
    active_set: bool = True,
) -> SolveResult:
    """Quantize W with OBQ (exact greedy per row).

    :param W: (rows, cols) weights.
    :param H: (cols, cols) Hessian ``2·XᵀX/n``.
    :param bits: 2..8, or 0 to remove every row.
    :param mask: (rows, cols) bool, False where the weight is pruned (it stays exactly 0; the
        kept weights should be the pruned layer's, e.g. ``exact_obs_prune(...).weight``).
    :param grid: how the per-row grid is fitted (once, up front, on W).
    :param damp: relative damping of H for the solve.
    :param outlier_rule: fix weights pushed outside the clipped grid first.
    :param row_batch: rows per batch (default: ``numerics.auto_row_batch``).
    :param dtype: working precision (default: ``numerics.solve_dtype``).
    :param lazy_rank: downdates queued per GEMM flush (1 = eager); the result does not
        depend on it.
    :param active_set: drop fixed coordinates at flushes; the result does not depend on it.
    :returns: SolveResult with the grid and ``row_error`` under the undamped H.
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
    s = g.scale.to(dt)[:, None]
    X = (W.to(dt) / s).masked_fill(prep.dead[None, :], 0.0)  # weights in grid units
    lo, hi = -g.zero.to(dt)[:, None], g.maxq - g.zero.to(dt)[:, None]
    keep = None if mask is None else mask.to(device=W.device, dtype=torch.bool)
    Hinv = inverse_hessian(prep).to(dt) if keep is None else None
    width = cols if keep is None else int(keep.sum(1).max()) if rows else 0  # per-row matrix size
    # with a mask every row's support inverse is built in float64 (support_inverse) beside the
    # working copy: about four float32 (width, width) matrices a row at the peak
    R = row_batch or auto_row_batch(rows, max(width, 1), dt, W.device,
                                    copies=1 if keep is None else 4)
    codes = torch.empty_like(X)
    for r1 in range(0, rows, R):
        b = slice(r1, min(r1 + R, rows))
        if keep is None:
            inv = LazyInverse(X[b], Hinv, lazy_rank, active_set, steps=cols)
        else:
            idx, Hs = support_inverse(prep.H, keep[b])
            pad = idx == cols
            sup = idx.clamp(max=cols - 1)
            # least-squares optimum on the support: w_S += (H_SS)⁻¹ H_SP w_P (0 if w_P = 0)
            v = (X[b].masked_fill(keep[b], 0.0).to(torch.float64) @ prep.H).gather(1, sup)
            xs = X[b].gather(1, sup).to(torch.float64) + torch.bmm(Hs, v[:, :, None]).squeeze(2)
            xs = xs.masked_fill(pad, 0.0).to(dt)
            inv = LazyInverse(xs, Hs.to(dt), lazy_rank, active_set, idx=idx, cols=cols,
                              steps=xs.shape[1])
        greedy_quantize(inv, lo[b], hi[b], inv.n, outlier_rule)
        codes[b] = torch.clamp(inv.result().round(), lo[b], hi[b])
    W_hat = (s * codes).to(W.dtype)
    if keep is not None:
        W_hat = W_hat.masked_fill(~keep, 0.0)
    return SolveResult(
        W_hat,
        row_errors(W, W_hat, H),
        mask=keep,
        scale=g.scale,
        zero=g.zero,
        bits=bits,
        info={"method": "obq"},
    )
