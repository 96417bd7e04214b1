"""Fast mode: per-row best of fixed-order GPTQ candidates, then 1-opt moves (docs/solvers.md §7).

Rows are independent problems sharing H, so taking, row by row, the best of several candidate
solutions is exact. 1-opt then moves single weights by one grid step while that lowers the row's
true error ``0.5·eHeᵀ`` (e = ŵ − w): moving coordinate j by δ changes it by
``Δ = δ·(eH)_j + δ²·H_jj / 2``. Each sweep applies, in every row at once, the best improving move.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from automl_compress.solvers.checks import check_bits, check_hessian, check_weight
from automl_compress.solvers.gptq import gptq_quantize
from automl_compress.solvers.hessian import DEFAULT_DAMP, row_errors
from automl_compress.solvers.obq import obq_quantize
from automl_compress.solvers.quantizer import GridSpec
from automl_compress.solvers.result import SolveResult


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
    codes = torch.round(W_hat.to(dt) / s) + z
    E = W_hat.to(dt) - W.to(dt)
    G = E @ Hd
    hdiag = torch.diagonal(Hd)[None, :]
    movable = torch.ones_like(codes, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    rows = W.shape[0]
    ar = torch.arange(rows, device=W.device)
    inf = torch.tensor(float("inf"), dtype=dt, device=W.device)
    for _ in range(max_sweeps or 4 * W.shape[1]):
        up = torch.where(movable & (codes < maxq), s * G + s * s * hdiag / 2, inf)
        down = torch.where(movable & (codes > 0), -s * G + s * s * hdiag / 2, inf)
        best_up, j_up = up.min(dim=1)
        best_dn, j_dn = down.min(dim=1)
        use_up = best_up <= best_dn
        gain = torch.where(use_up, best_up, best_dn)
        j = torch.where(use_up, j_up, j_dn)
        step = torch.where(use_up, 1.0, -1.0).to(dt)
        improve = gain < -1e-12 * (G.abs().sum(1) * s[:, 0] + 1e-300)
        if not bool(improve.any()):
            break
        step = step * improve.to(dt)
        codes[ar, j] += step
        delta = step * s[:, 0]
        E[ar, j] += delta
        G += delta[:, None] * Hd[j]
    return (s * (codes - z)).to(W_hat.dtype)


def _candidates(
    W: torch.Tensor, H: torch.Tensor, bits: int, names: Sequence[str], seed: int, **kw
) -> list[SolveResult]:
    out = []
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        if name == "natural":
            out.append(gptq_quantize(W, H, bits, **kw))
        elif name == "act_order":
            out.append(gptq_quantize(W, H, bits, act_order=True, **kw))
        elif name == "obq":
            out.append(obq_quantize(W, H, bits, **kw))
        elif name.startswith("random:"):
            for _ in range(int(name.split(":", 1)[1])):
                order = torch.randperm(W.shape[1], generator=gen)
                out.append(gptq_quantize(W, H, bits, order=order, **kw))
        else:
            raise ValueError(
                f"candidate must be 'natural', 'act_order', 'obq' or 'random:K', found {name!r}"
            )
    return out


def fast_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int = 4,
    *,
    candidates: Sequence[str] = ("natural", "act_order", "random:4"),
    one_opt_polish: bool = True,
    grid: GridSpec | None = None,
    damp: float = DEFAULT_DAMP,
    mask: torch.Tensor | None = None,
    seed: int = 0,
    row_batch: int | None = None,
    dtype: torch.dtype | None = None,
) -> SolveResult:
    """Quantize W by the per-row best of several fixed-order candidates, then 1-opt.

    Args:
        W: (rows, cols) weights.
        H: (cols, cols) Hessian ``2·XᵀX/n``.
        bits: 2..8, or 0 to remove every row.
        candidates: 'natural', 'act_order', 'obq' and 'random:K' (K seeded random orders).
        one_opt_polish: run the 1-opt pass on the chosen rows.
        grid: how the per-row grid is fitted, as for :func:`gptq_quantize`; all candidates
            share the grid.
        damp: relative damping of H, as for :func:`gptq_quantize`.
        mask: (rows, cols) bool, False where the weight is pruned, as for :func:`gptq_quantize`.
        dtype: working precision, as for :func:`gptq_quantize`.
        seed: seed of the random orders.
        row_batch: rows per batch of every candidate (rows are independent).

    Returns:
        SolveResult with ``row_error`` under the undamped H; ``info["chosen"]`` is the index of
        the candidate each row came from.
    """
    check_weight(W)
    check_hessian(H, W.shape[1])
    check_bits(bits)
    if not candidates:
        raise ValueError("candidates must name at least one candidate, found none")
    kw = {"grid": grid, "damp": damp, "mask": mask, "dtype": dtype, "row_batch": row_batch}
    if bits == 0:
        return gptq_quantize(W, H, 0, **kw)
    cands = _candidates(W, H, bits, candidates, seed, **kw)
    errs = torch.stack([c.row_error for c in cands])  # (C, rows)
    chosen = errs.argmin(dim=0)
    stack = torch.stack([c.weight for c in cands])
    W_hat = stack[chosen, torch.arange(W.shape[0], device=W.device)]
    first = cands[0]
    if one_opt_polish:
        W_hat = one_opt(W, W_hat, H, first.scale, first.zero, bits, mask=mask)
    return SolveResult(
        W_hat,
        row_errors(W, W_hat, H),
        mask=None if mask is None else mask.to(torch.bool),
        scale=first.scale,
        zero=first.zero,
        bits=bits,
        info={"method": "fast", "chosen": chosen, "candidates": tuple(candidates)},
    )
