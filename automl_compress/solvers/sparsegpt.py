"""SparseGPT: fast pruning with a fixed column order.

Frantar, Alistarh, "SparseGPT", ICML 2023 (arXiv 2301.00774); docs/solvers.md §6. Columns are
eliminated left to right for all rows at once, so every row uses the same chain of inverses (the
upper Cholesky factor U of H⁻¹) and the pass is the shared column sweep
(:func:`~automl_compress.solvers.sweep.column_sweep`): a pruned column's target is 0, a kept one's
its grid value when quantizing (joint prune + quantize) or itself.

Masks are chosen adaptively, once per block, from the *current* (already compensated) weights by
the OBS score ``w_j² / U_jj²``: for unstructured sparsity the block's share of zeros is taken
jointly over all rows (so per-row and per-column counts vary; ``allocation="uniform"`` takes the
same count in every row); for N:M the M − N lowest scores of every group of M are pruned when the
group is reached. The layer gets exactly ``round(sparsity · rows · cols)`` zeros. With ``bits``
the kept weights are quantized in the same pass (joint prune + quantize).
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
    InverseFactors,
    permuted_upper,
    prepare_hessian,
    row_errors,
)
from automl_compress.solvers.numerics import solve_dtype
from automl_compress.solvers.quantizer import GridSpec, QuantGrid, fit_grid
from automl_compress.solvers.result import SolveResult
from automl_compress.solvers.sweep import column_sweep

DEFAULT_BLOCK_SIZE = 128


class _MaskedTarget:
    """SparseGPT's sweep target: choose the block's (or group's) mask, then prune or round.

    At the first column of every block of ``Bs`` columns (unstructured) or of every group of M
    (N:M), the weights to prune are chosen by the OBS score ``w_j² / U_jj²`` of the *current*
    weights; a pruned column's target is 0, a kept one's its grid value (or itself).
    """

    def __init__(
        self,
        U: torch.Tensor,
        pruned: torch.Tensor,
        grid: QuantGrid | None,
        sparsity: float,
        n_m: tuple[int, int] | None,
        Bs: int,
        allocation: str,
    ) -> None:
        self.d = torch.diagonal(U)
        self.pruned, self.grid = pruned, grid
        self.sparsity, self.n_m, self.Bs, self.allocation = sparsity, n_m, Bs, allocation

    def _choose_block(self, i1: int, W1: torch.Tensor) -> None:
        rows, width = W1.shape
        score = W1 * W1 / (self.d[i1 : i1 + width] ** 2)[None, :]
        if self.allocation == "uniform":  # the same count in every row
            k = round(self.sparsity * (i1 + width)) - round(self.sparsity * i1)
            if k > 0:
                drop = score.topk(k, dim=1, largest=False).indices
                self.pruned[:, i1 : i1 + width].scatter_(1, drop, True)
            return
        k = round(self.sparsity * rows * (i1 + width)) - round(self.sparsity * rows * i1)
        if k > 0:  # jointly over the rows: per-row and per-column counts vary
            drop = score.reshape(-1).topk(k, largest=False).indices
            block = torch.zeros(rows * width, dtype=torch.bool, device=W1.device)
            block[drop] = True
            self.pruned[:, i1 : i1 + width] |= block.view(rows, width)

    def __call__(self, i: int, W1: torch.Tensor, j: int) -> torch.Tensor:
        if self.n_m is None and j == 0:
            self._choose_block(i, W1)
        elif self.n_m is not None and j % self.n_m[1] == 0:
            n, m = self.n_m
            score = W1[:, j : j + m] ** 2 / (self.d[i : i + m] ** 2)[None, :]
            drop = score.topk(m - n, dim=1, largest=False).indices
            self.pruned[:, i : i + m].scatter_(1, drop, True)
        w = W1[:, j]
        q = w if self.grid is None else self.grid.quantize(w[:, None]).squeeze(1)
        return q.masked_fill(self.pruned[:, i], 0.0)


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
    allocation: str = "global",
    row_batch: int | None = None,
    dtype: torch.dtype | None = None,
    factors: InverseFactors | None = None,
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
        allocation: unstructured only: ``"global"`` picks each block's zeros jointly over all
            rows (the paper); ``"uniform"`` gives every row the same count of zeros.
        row_batch: rows per sweep (default all); not with global allocation, which chooses
            masks across rows.
        dtype: working precision (default: :func:`~automl_compress.solvers.numerics.solve_dtype`).
        factors: H's factors shared with other solves of the same H (the result does not
            depend on it).

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
    if allocation not in ("global", "uniform"):
        raise InvalidInputError(
            f"allocation must be 'global' or 'uniform', found {allocation!r}"
        )
    if row_batch is not None and n_m is None and allocation == "global":
        raise InvalidInputError(
            f"row_batch={row_batch} with global allocation would choose each batch's zeros "
            "separately; pass allocation='uniform' (same count per row) or row_batch=None"
        )
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
    wd = solve_dtype(W, dtype)
    perm_d = perm.to(dev)
    H = H.to(dev)
    prep = factors.prepared(H, damp) if factors is not None else prepare_hessian(H, damp)
    U = (factors.upper(H, damp, perm_d) if factors is not None
         else permuted_upper(prep, perm_d)).to(wd)
    Wk = W[:, perm_d].to(wd).masked_fill(prep.dead[perm_d][None, :], 0.0)
    qgrid = fit_grid(Wk, bits, grid) if bits is not None else None
    pruned = torch.zeros((rows, cols), dtype=torch.bool, device=dev)
    R = row_batch or max(rows, 1)
    for r1 in range(0, rows, R):
        b = slice(r1, min(r1 + R, rows))
        g_b = None if qgrid is None else QuantGrid(qgrid.scale[b], qgrid.zero[b], bits)
        target = _MaskedTarget(U, pruned[b], g_b, sparsity, n_m, Bs, allocation)
        Wk[b] = column_sweep(Wk[b].clone(), U, target, Bs)
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
