"""SparseGPT: fast pruning with a fixed column order (ALGORITHMS.md §2.4).

Columns are eliminated left to right for all rows at once. Pruning (or rounding) column j of a row
is compensated only with the columns to its right, so every row uses the same chain of inverses: the
rows of the upper Cholesky factor U of H⁻¹ (``H⁻¹ = UᵀU``). The error of column j,
``e_j = (w_j − t_j) / U_jj`` (t_j = 0 when pruned, the grid value when kept and quantizing), is
propagated as ``w[j:] −= e_j · U[j, j:]`` inside a block of ``block_size`` columns, and to the rest
of the matrix by one GEMM per block.

Masks are chosen adaptively, once per block, from the *current* (already compensated) weights by
the OBS score ``w_j² / U_jj²``: for unstructured sparsity the block's share of zeros is taken
jointly over all rows (so per-row and per-column counts vary); for N:M the M − N lowest scores of
every group of M are pruned when the group is reached. The layer gets exactly
``round(sparsity · rows · cols)`` zeros. With ``bits`` the kept weights are quantized in the same
pass (joint prune + quantize).
"""

from __future__ import annotations

import torch

from automl_compress.errors import InvalidInputError, NMPatternError
from automl_compress.solvers.checks import (
    check_bits,
    check_hessian,
    check_n_m,
    check_sparsity,
    check_weight,
)
from automl_compress.solvers.exact_obs import channel_major_perm
from automl_compress.solvers.hessian import (
    DEFAULT_DAMP,
    prepare_hessian,
    row_errors,
    upper_cholesky_of_inverse,
)
from automl_compress.solvers.lstsq import solve_dtype
from automl_compress.solvers.quantizer import GridSpec, fit_grid
from automl_compress.solvers.result import SolveResult

DEFAULT_BLOCK_SIZE = 128


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float = 0.5,
    *,
    n_m: tuple[int, int] | None = None,
    bits: int | None = None,
    grid: GridSpec | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    damp: float = DEFAULT_DAMP,
    kernel_area: int = 1,
    dtype: torch.dtype | None = None,
) -> SolveResult:
    """Prune (and optionally quantize) a layer with SparseGPT.

    Args:
        W: (rows, cols) weights; conv weights flattened as ``weight.flatten(1)``.
        H: (cols, cols) Hessian ``2·XᵀX/n``.
        sparsity: layer sparsity in [0, 1); ignored when ``n_m`` is given.
        n_m: keep N of every M consecutive weights (input channels at one tap), e.g. (2, 4).
        bits: quantize the kept weights to this many bits (2..8) in the same pass.
        grid: how the per-row grid is fitted (default: symmetric MSE search), on the original
            weights before the pass.
        block_size: columns per mask-selection / lazy-update block (B_s, default 128; rounded down
            to a multiple of M for N:M).
        damp: relative damping of H for the solve (errors use the undamped H).
        kernel_area: kh·kw for conv layers whose columns are ordered (C_in, kh, kw); only used
            with ``n_m`` (groups along input channels at a fixed tap).
        dtype: working precision (default float64 on CPU, float32 on CUDA).

    Returns:
        SolveResult with weight (W's dtype/device), exact ``row_error`` under the undamped H,
        ``mask`` (True = kept) and, with ``bits``, the grid's ``scale``/``zero``/``bits``.

    Raises:
        InvalidInputError: bad inputs (named subclasses: NonFiniteError, ShapeMismatchError,
            SparsityOutOfRangeError, NMPatternError, BitsOutOfRangeError).
        HessianNotPSDError: if the damped H cannot be factorised.
    """
    check_weight(W)
    rows, cols = W.shape
    check_hessian(H, cols)
    if not isinstance(block_size, int) or block_size < 1:
        raise InvalidInputError(f"block_size must be an int >= 1, found {block_size!r}")
    if bits is not None:
        check_bits(bits, allow_zero=False)
    if n_m is not None:
        n, m = check_n_m(n_m, cols)
        perm = channel_major_perm(cols, kernel_area)
        if (cols // kernel_area) % m:
            raise NMPatternError(
                f"N:M {n}:{m} runs along input channels, so C_in = {cols // kernel_area} must be a "
                f"multiple of {m}; use unstructured sparsity for this layer"
            )
        Bs = max(m, block_size // m * m)
    else:
        check_sparsity(sparsity)
        perm = torch.arange(cols)
        Bs = block_size

    dev = W.device
    wd = solve_dtype(dev, dtype)
    perm_d = perm.to(dev)
    prep = prepare_hessian(H.to(dev)[perm_d][:, perm_d], damp)
    U = upper_cholesky_of_inverse(prep).to(wd)
    Wk = W[:, perm_d].to(wd).masked_fill(prep.dead[None, :], 0.0)
    qgrid = fit_grid(Wk, bits, grid) if bits is not None else None
    pruned = torch.zeros((rows, cols), dtype=torch.bool, device=dev)

    for i1 in range(0, cols, Bs):
        i2 = min(cols, i1 + Bs)
        W1 = Wk[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diagonal(U1)
        Err1 = torch.zeros_like(W1)
        P1 = torch.zeros_like(W1, dtype=torch.bool)
        if n_m is None:
            k_block = round(sparsity * rows * i2) - round(sparsity * rows * i1)
            if k_block > 0:
                score = (W1 * W1 / (d1 * d1)[None, :]).reshape(-1)
                drop = score.topk(k_block, largest=False).indices
                P1.view(-1)[drop] = True
        for i in range(i2 - i1):
            if n_m is not None and i % m == 0:
                score = W1[:, i : i + m] ** 2 / (d1[i : i + m] ** 2)[None, :]
                drop = score.topk(m - n, dim=1, largest=False).indices
                P1[:, i : i + m].scatter_(1, drop, True)
            w = W1[:, i]
            q = w if qgrid is None else qgrid.quantize(w[:, None]).squeeze(1)
            q = q.masked_fill(P1[:, i], 0.0)
            err = (w - q) / d1[i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        Wk[:, i1:i2] = W1
        pruned[:, i1:i2] = P1
        if i2 < cols:
            Wk[:, i2:] -= Err1 @ U[i1:i2, i2:]

    W_hat = torch.empty_like(Wk)
    W_hat[:, perm_d] = Wk.masked_fill(pruned, 0.0)
    keep = torch.empty_like(pruned)
    keep[:, perm_d] = ~pruned
    W_hat = W_hat.to(W.dtype)
    info = {"method": "sparsegpt", "block_size": Bs}
    if n_m is not None:
        info["pattern"] = f"{n}:{m}"
    return SolveResult(
        W_hat,
        row_errors(W, W_hat, H.to(dev)),
        mask=keep,
        scale=qgrid.scale.to(W.dtype) if qgrid is not None else None,
        zero=qgrid.zero.to(W.dtype) if qgrid is not None else None,
        bits=bits,
        info=info,
    )
