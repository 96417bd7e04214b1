"""Exact least-squares weights on a fixed support (docs/solvers.md §2, §4, §6).

For one row ``w`` and a support S (kept coordinates, the rest P pruned to zero) the optimum of
``0.5 · (w − v) H (w − v)ᵀ`` with ``v_P = 0`` is ``v_S = H_SS⁻¹ (H w)_S``. Two ways to get it:

* :func:`resolve_on_mask` — one Cholesky solve per row on its mask (rows with the same mask share
  the factorisation). Use it to refine any mask, e.g. SparseGPT's.
* :func:`replay_order` — given each row's elimination order π (e.g. the ExactOBS greedy order), the
  weights after *every* prefix of π are the least-squares optima on the remaining support. One
  Cholesky of the permuted inverse ``H_π⁻¹ = UᵀU`` per row, then GPTQ's fixed-order update
  ``w[i:] −= (w_i / U_ii) · U[i, i:]`` snapshotted at the requested counts. This is how all sparsity
  levels of one greedy pass are rebuilt without storing weight traces.
"""

from __future__ import annotations

import torch

from automl_compress.errors import HessianNotPSDError, ShapeMismatchError
from automl_compress.solvers.checks import check_hessian, check_weight
from automl_compress.solvers.hessian import DEFAULT_DAMP, prepare_hessian, row_errors
from automl_compress.solvers.numerics import auto_row_batch, restricted, solve_dtype
from automl_compress.solvers.result import SolveResult
from automl_compress.solvers.sweep import column_sweep


def _cholesky_batched(A: torch.Tensor, what: str, upper: bool = False) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(A, upper=upper)
    if bool((info != 0).any()):
        raise HessianNotPSDError(
            f"{what} is not positive definite even after damping (batched Cholesky failed); "
            "expected a PSD Hessian 2·XᵀX/n: check the calibration inputs, or raise damp"
        )
    return L


def _padded_support(mask: torch.Tensor, which: bool, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (n, m) of the coordinates where ``mask == which``, padded.

    The coordinates come first, in column order; also a (n, m) bool telling the real ones from the
    padding.
    """
    key = (mask != which).to(torch.int8)
    idx = torch.argsort(key, dim=1, stable=True)[:, :m]
    valid = torch.gather(mask == which, 1, idx)
    return idx, valid


def masked_solve(
    W: torch.Tensor,
    H: torch.Tensor,
    mask: torch.Tensor,
    row_batch: int | None = None,
    Hinv: torch.Tensor | None = None,
) -> torch.Tensor:
    """Least-squares optimum of every row of W on its mask under a (damped, PD) H.

    Every row takes the cheaper of two exact forms, so no factorisation is larger than cols/2
    (about 1/8 of the work of a full per-row Cholesky):

    * few kept (k ≤ cols/2): ``v_S = H_SS⁻¹ (H w)_S``;
    * few pruned (|P| < cols/2): remove P in one group-OBS step,
      ``v = w − (H⁻¹)_{:,P} ((H⁻¹)_PP)⁻¹ w_P`` (the correction as one dense GEMM).

    Rows of one form are sorted by the size of their factorisation, so a batch pads little, and
    rows of a batch with the same mask share one factorisation.

    Args:
        W: (rows, cols) weights in the working dtype.
        H: (cols, cols) positive-definite Hessian in the working dtype, on W's device.
        mask: (rows, cols) bool, True = kept.
        row_batch: rows per batch (default: from memory).
        Hinv: H⁻¹ if already known (computed here when needed otherwise).

    Returns:
        (rows, cols) weights, exactly zero where ``mask`` is False.
    """
    rows, cols = W.shape
    out = torch.zeros_like(W)
    if rows == 0 or cols == 0:
        return out
    R = row_batch or auto_row_batch(rows, cols, W.dtype, W.device)
    kept = mask.sum(dim=1)
    few_kept = kept <= cols - kept
    size = torch.where(few_kept, kept, cols - kept)
    # identical masks of one size land next to each other and share one factorisation
    _, same = torch.unique(mask.to(torch.uint8), dim=0, return_inverse=True)
    HW = None
    for form in (True, False):
        (sel,) = torch.nonzero(few_kept == form, as_tuple=True)
        if form is False and Hinv is None and sel.numel() and int(size[sel].max()):
            Hinv = torch.cholesky_inverse(_cholesky_batched(H, "H"))
        sel = sel[torch.argsort(size[sel] * rows + same[sel], stable=True)]
        if form and sel.numel():
            HW = W[sel] @ H  # (H w)ᵀ of these rows, in batch order; H is symmetric
        for start in range(0, sel.numel(), R):
            part = slice(start, start + R)
            idx_rows = sel[part]
            s = int(size[idx_rows].max())
            if form is False and s == 0:
                out[idx_rows] = W[idx_rows]
                continue
            m = mask[idx_rows]
            uniq, inv = torch.unique(m.to(torch.uint8), dim=0, return_inverse=True)
            if uniq.shape[0] == m.shape[0]:  # all masks differ: factor the rows as they are
                uniq, inv = m, slice(None)
            uniq = uniq.bool()
            if form:
                sup, valid = _padded_support(uniq, True, max(s, 1))
                U = _cholesky_batched(restricted(H, sup, valid), "H restricted to a row's support",
                                      upper=True)
                sup, valid = sup[inv], valid[inv]
                b = torch.gather(HW[part], 1, sup) * valid
                v = torch.cholesky_solve(b.unsqueeze(-1), U[inv], upper=True).squeeze(-1)
                res = torch.zeros((len(idx_rows), cols), dtype=W.dtype, device=W.device)
                res.scatter_add_(1, sup, v * valid)
            else:
                drop, valid = _padded_support(uniq, False, s)
                U = _cholesky_batched(restricted(Hinv, drop, valid), "H⁻¹ on the pruned set",
                                      upper=True)
                drop, valid = drop[inv], valid[inv]
                w = W[idx_rows]
                b = torch.gather(w, 1, drop) * valid
                z = torch.cholesky_solve(b.unsqueeze(-1), U[inv], upper=True).squeeze(-1) * valid
                zf = torch.zeros_like(w).scatter_add_(1, drop, z)
                res = w - zf @ Hinv
            out[idx_rows] = torch.where(m, res, torch.zeros_like(res))
    return out


def replay_order(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    order: torch.Tensor,
    counts: torch.Tensor,
    row_batch: int | None = None,
) -> torch.Tensor:
    """Weights after removing the first ``counts[l, r]`` coordinates of ``order[r]`` from row r.

    Every snapshot is the exact least-squares optimum on the remaining support (docs/solvers.md §4,
    order reconstruction), computed from one Cholesky factor per row, not from weight traces.

    Args:
        W: (rows, cols) dense weights in the working dtype.
        Hinv: (cols, cols) inverse of the damped Hessian, same dtype and device.
        order: (rows, cols) int64 elimination order of every row (a permutation of 0..cols-1).
        counts: (levels, rows) int64 on the CPU, numbers of removed coordinates, in [0, cols].
        row_batch: rows per batch (default: from memory).

    Returns:
        (levels, rows, cols) weights, exactly zero on the removed coordinates.
    """
    rows, cols = W.shape
    levels = counts.shape[0]
    out = torch.zeros((levels, rows, cols), dtype=W.dtype, device=W.device)
    if rows == 0 or cols == 0 or levels == 0:
        return out
    counts = counts.to("cpu", torch.int64)
    R = row_batch or auto_row_batch(rows, cols, W.dtype, W.device)
    for start in range(0, rows, R):
        stop = min(rows, start + R)
        pi = order[start:stop].to(W.device)
        w = torch.gather(W[start:stop], 1, pi)  # permuted weights: step i removes column i
        U = _cholesky_batched(Hinv[pi[:, :, None], pi[:, None, :]], "H⁻¹ in elimination order",
                              upper=True)
        snaps = _replay_batch(w, U, counts[:, start:stop])
        # undo the permutation
        out[:, start:stop].scatter_(2, pi.unsqueeze(0).expand(levels, -1, -1), snaps)
    return out


def _replay_batch(w: torch.Tensor, U: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Snapshots (levels, R, d) of the permuted rows ``w`` after ``k[l, r]`` removals each."""
    levels, (R, d) = k.shape[0], w.shape
    snaps = torch.zeros((levels, R, d), dtype=w.dtype, device=w.device)
    # (level, row) pairs to snapshot after each number of steps, decided on the host
    hits: list[list[tuple[int, int]]] = [[] for _ in range(d + 1)]
    for lv, r in zip(*torch.nonzero(k >= 0, as_tuple=True), strict=True):
        hits[int(k[lv, r])].append((int(lv), int(r)))
    cols_idx = torch.arange(d, device=w.device)
    kmax = int(k.max())

    def snapshot(i: int) -> None:
        lv_idx = torch.tensor([h[0] for h in hits[i]], device=w.device)
        r_idx = torch.tensor([h[1] for h in hits[i]], device=w.device)
        snaps[lv_idx, r_idx] = torch.where(cols_idx[None, :] < i, 0.0, w[r_idx])

    def target(i: int, W1: torch.Tensor, j: int) -> torch.Tensor:
        if hits[i]:
            snapshot(i)
        return torch.zeros_like(W1[:, j]) if i < kmax else W1[:, j].clone()

    column_sweep(w, U, target, 1)  # block width 1: every snapshot sees the current row
    if hits[d]:
        snapshot(d)
    return snaps


def resolve_on_mask(
    W: torch.Tensor,
    H: torch.Tensor,
    mask: torch.Tensor,
    damp: float = DEFAULT_DAMP,
    *,
    row_batch: int | None = None,
    dtype: torch.dtype | None = None,
) -> SolveResult:
    """Exact least-squares re-solve of every row on its given support.

    Keeps the mask and replaces the kept weights by ``v_S = H_SS⁻¹ (H w)_S`` (damped H), the best
    any method can do with that mask. Rows with the same mask share one Cholesky factorisation.

    Args:
        W: (rows, cols) dense weights (the original, uncompressed layer).
        H: (cols, cols) Hessian ``2·XᵀX/n``.
        mask: (rows, cols) bool, True = kept.
        damp: relative damping (fraction of the mean diagonal).
        row_batch: rows per batch (default: sized from memory).
        dtype: working precision (default float64 on CPU, float32 on CUDA).

    Returns:
        SolveResult with the re-solved weight (W's dtype/device), the exact ``row_error`` under the
        undamped H, and ``mask``.

    Raises:
        ShapeMismatchError: if mask is not a (rows, cols) bool tensor.
        HessianNotPSDError: if a restricted Hessian cannot be factorised.
    """
    check_weight(W)
    rows, cols = W.shape
    check_hessian(H, cols)
    if not isinstance(mask, torch.Tensor) or mask.shape != W.shape or mask.dtype != torch.bool:
        found = (tuple(mask.shape), mask.dtype) if isinstance(mask, torch.Tensor) else type(mask)
        raise ShapeMismatchError(
            f"mask must be a bool tensor of W's shape {tuple(W.shape)}, found {found}; "
            "pass result.mask of a pruning solver (True = kept)"
        )
    wd = solve_dtype(W, dtype)
    prep = prepare_hessian(H.to(W.device), damp)
    Wk = W.to(wd).masked_fill(prep.dead[None, :], 0.0)
    W_hat = masked_solve(Wk, prep.H.to(wd), mask.to(W.device), row_batch).to(W.dtype)
    err = row_errors(W, W_hat, H.to(W.device))
    return SolveResult(W_hat, err, mask=mask.to(W.device).clone(), info={"method": "lstsq"})
