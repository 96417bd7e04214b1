"""CHITA: combinatorial refinement of a pruning mask on the layer quadratic.

Benbaki, Chen, Meng, Hazimeh, Ponomareva, Zhao, Mazumder, "Fast as CHITA: Neural Network Pruning
with Combinatorial Optimization", ICML 2023, https://arxiv.org/abs/2302.14623.

Every row w of a layer is an independent problem with the shared H (docs/pruning.md §1):

    min_v  ½ (w − v) H (w − v)ᵀ + λ ‖v − w‖²   s.t. v has at most k_r nonzeros (or N of every M).

With ``A = H + 2λI`` this is ``½ (w − v) A (w − v)ᵀ``. λ is the solvers' damping,
``2λ = damp · mean diag(H)``, so ExactOBS, SparseGPT and CHITA minimise the same function and a
warm start from either is a feasible point of it. From the warm start three moves lower it:

1. **IHT with CHITA's line search on an active set.** ``v ← P(v − τ g)``, ``g = A (v − w)``, P keeps
   the k_r largest |·| of the row's active set (the warm support plus the ``(kimp − 1)·k_r`` best
   outside coordinates by ``g_j² / A_jj``), or the N largest of every group of M. Step sizes tried:
   the exact minimiser along −g on the support, ``τ* = ‖g_S‖² / g_Sᵀ A g_S``, and CHITA's search
   from ``τ_c``, the first step at which the kept set can change, doubled while the thresholded
   objective keeps dropping. A row moves only when the exact objective drops.
2. **Swaps.** On the least-squares optimum of a support S (``v_S = A_SS⁻¹ (A w)_S``), taking i out
   and j in changes the objective by exactly

       Δ(i, j) = v_i² / (2 Σ_ii) − (g_j − v_i B_ji / Σ_ii)² / (2 (s_j + B_ji² / Σ_ii)),

   with ``Σ = A_SS⁻¹``, ``B = A_PS Σ``, ``s_j = A_jj − A_jS Σ A_Sj`` (the Schur complement) and
   ``g_j = (A (v − w))_j`` on the pruned set P (OBS removal, then the exact gain of adding j to
   S∖{i}). Each round every row takes its best pair if Δ < 0 (N:M: i and j in the same group);
   Σ, B, s, g and v follow the swap by rank-1 updates, O(|S|·|P|) per row, and are recomputed every
   ``refresh`` rounds.
3. **Backsolve.** The final support gets the exact optimum ``v_S = A_SS⁻¹ (A w)_S`` (one Cholesky
   of ``A_SS = H_SS + 2λI`` per row).

Step 1 lives in :mod:`.chita_iht`, steps 2 and 3 in :mod:`.chita_swaps`, the option checks and
the warm start in :mod:`.chita_setup`; this module builds the damped problem and runs the steps
row batch by row batch.
Rows run as batched tensor ops, the same code on CPU and CUDA. A row whose error under the
undamped H would end above its warm start's keeps the warm start, so the result is never worse.

Example (2 columns, keep 1; the warm start keeps the larger weight, the wrong one here)::

    >>> import torch
    >>> W = torch.tensor([[1.0, 0.9]], dtype=torch.float64)
    >>> H = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    >>> res = chita_prune(W, H, warm_start=torch.tensor([[True, False]]), damp=0.0)
    >>> res.mask.tolist(), round(res.error, 3)
    ([[False, True]], 0.5)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from automl_compress.solvers.checks import (
    check_hessian,
    check_weight,
)
from automl_compress.solvers.chita_iht import iht, project
from automl_compress.solvers.chita_setup import (
    build_warm_start,
    check_options,
    column_order,
)
from automl_compress.solvers.chita_swaps import backsolve, pad, swap_batch
from automl_compress.solvers.gptq import gptq_quantize
from automl_compress.solvers.hessian import DEFAULT_DAMP, prepare_hessian, row_errors
from automl_compress.solvers.numerics import auto_row_batch
from automl_compress.solvers.obq import obq_quantize
from automl_compress.solvers.quantizer import GridSpec
from automl_compress.solvers.result import SolveResult

DEFAULT_IHT_ITERS = 5
DEFAULT_KIMP = 1.5
DEFAULT_REFRESH = 64
DEFAULT_RTOL = 1e-6
DEFAULT_CANDIDATES = 16


# ----------------------------------------------------------------------------------------------
# the three steps on one row batch


@dataclass(frozen=True)
class _Problem:
    """The layer problem in the working column order, shared by every row batch.

    Attributes:
        A: (d, d) ``H + 2λI`` (dead inputs neutralised) in the working precision.
        Ap: A padded by one zero row and column (:func:`~.chita_swaps.pad`).
        W: (rows, d) weights, zero on dead inputs.
        keep: (rows, d) warm-start mask.
        V: (rows, d) warm-start weights, zero where pruned.
        k: (rows,) kept weights per row.
    """

    A: torch.Tensor
    Ap: torch.Tensor
    W: torch.Tensor
    keep: torch.Tensor
    V: torch.Tensor
    k: torch.Tensor


def _problem(W, H, warm: SolveResult, perm: torch.Tensor, damp: float, wd: torch.dtype):
    """The damped, permuted problem of the layer (``perm``: the working column order)."""
    dev = W.device
    prep = prepare_hessian(H.to(dev)[perm][:, perm], damp)
    A = prep.H.to(wd)  # H + 2λI (dead inputs neutralised)
    Wk = W[:, perm].to(wd).masked_fill(prep.dead[None, :], 0.0)
    keep0 = warm.mask.to(dev)[:, perm]
    V0 = warm.weight.to(dev)[:, perm].to(wd).masked_fill(~keep0, 0.0)
    return _Problem(A, pad(A), Wk, keep0, V0, keep0.sum(1))


@dataclass(frozen=True)
class _Steps:
    """How far the steps go (the options of :func:`chita_prune` of the same names)."""

    n_m: tuple[int, int] | None
    kimp: float
    iht_iters: int
    max_swaps: int
    refresh: int
    rtol: float
    candidates: int


def _active_set(A, AW, V, keep, k, kimp):
    """Unstructured: the support plus the best outside coordinates by g_j² / A_jj.

    In all, ``ceil(kimp · k_r)`` coordinates of row r.
    """
    g = V @ A - AW
    score = (g * g / torch.diagonal(A)).masked_fill(keep, torch.inf)
    ka = torch.clamp(torch.ceil(kimp * k.to(A.dtype)).long(), max=A.shape[0])
    return project(score, torch.ones_like(keep), ka, None)


def _refine_rows(pb: _Problem, sl: slice, st: _Steps):
    """IHT, swaps and the backsolve on the rows ``sl``.

    Returns their mask, swaps per row, weights and the IHT iterations run.
    """
    A, Ap = pb.A, pb.Ap
    Wb, Vb, kb = pb.W[sl], pb.V[sl], pb.keep[sl]
    AW = Wb @ A
    wAw = (Wb * AW).sum(1)
    it = 0
    if st.iht_iters:
        if st.n_m is None:
            allowed, kbn = _active_set(A, AW, Vb, kb, pb.k[sl], st.kimp), pb.k[sl]
        else:
            allowed, kbn = torch.ones_like(kb), None
        Vb, kb, it = iht(A, AW, wAw, Vb, kb, allowed, kbn, st.n_m, st.iht_iters, st.rtol)
    kb, sw, Vs = swap_batch(A, Ap, AW, wAw, kb, st.n_m, st.max_swaps, st.refresh, st.rtol,
                            st.candidates)
    # 3. exact backsolve on the final support (done already for rows that made no swap)
    moved = sw > 0
    if Vs is None:
        Vs = backsolve(Ap, AW, kb)
    elif bool(moved.any()):
        Vs[moved] = backsolve(Ap, AW[moved], kb[moved])
    return kb, sw, Vs, it


def _unpermute(X_p: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Columns back from the working order: ``X[:, perm] = X_p``."""
    X = torch.empty_like(X_p)
    X[:, perm] = X_p
    return X


def _never_worse(W, H, W_hat, keep, warm: SolveResult):
    """The solve, never worse than the warm start on any row.

    Rows whose error under the undamped H ends above the warm start's keep the warm start; returns
    the weights, mask, per-row errors and the reverted rows.
    """
    dev = W.device
    err = row_errors(W, W_hat, H.to(dev))
    worse = err > warm.row_error.to(dev)
    if bool(worse.any()):
        W_hat = torch.where(worse[:, None], warm.weight.to(dev, W.dtype), W_hat)
        keep = torch.where(worse[:, None], warm.mask.to(dev), keep)
        err = torch.where(worse, warm.row_error.to(dev, torch.float64), err)
    return W_hat, keep, err, worse


# ----------------------------------------------------------------------------------------------
# public entry point


def chita_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float = 0.5,
    *,
    n_m: tuple[int, int] | None = None,
    warm_start: str | torch.Tensor | SolveResult = "exact_obs",
    allocation: str = "global",
    kernel_area: int = 1,
    damp: float = DEFAULT_DAMP,
    iht_iters: int = DEFAULT_IHT_ITERS,
    kimp: float = DEFAULT_KIMP,
    max_swaps: int | None = None,
    refresh: int = DEFAULT_REFRESH,
    rtol: float = DEFAULT_RTOL,
    candidates: int = DEFAULT_CANDIDATES,
    bits: int | None = None,
    quant: str = "gptq",
    grid: GridSpec | None = None,
    row_batch: int | None = None,
    dtype: torch.dtype | None = None,
) -> SolveResult:
    """Prune a layer with CHITA: IHT + swaps + exact backsolve, refining a warm-start mask.

    Every row keeps exactly its warm start's number of weights (unstructured) or N of every M.

    Args:
        W: (rows, cols) weights; conv weights flattened as ``weight.flatten(1)``.
        H: (cols, cols) Hessian ``2·XᵀX/n`` (undamped; errors are reported under it).
        sparsity: layer sparsity in [0, 1) for a solver warm start; ignored with ``n_m`` or a mask.
        n_m: keep N of every M consecutive weights (input channels at one tap), e.g. (2, 4).
        warm_start: ``"exact_obs"``, ``"sparsegpt"``, a (rows, cols) bool mask (True = kept) or a
            pruning :class:`SolveResult`; its per-row kept counts are kept.
        allocation: per-row counts of an ExactOBS warm start, ``"global"`` or ``"uniform"``.
        kernel_area: kh·kw for conv layers with columns ordered (C_in, kh, kw); 1 otherwise.
        damp: relative damping; CHITA's ridge is ``λ = damp · mean diag(H) / 2``.
        iht_iters: IHT iterations at most (0: none).
        kimp: the active set holds ``ceil(kimp · k_r)`` coordinates of row r (>= 1).
        max_swaps: swap rounds at most (default: cols); each round is one swap per row.
        refresh: recompute the swap state from scratch every this many rounds.
        candidates: swaps bring in one of the row's this many pruned coordinates of largest
            single-coordinate gain (a row stops when none of them gives a drop).
        rtol: a move is taken only if it lowers a row's objective by more than ``rtol`` of it.
        bits: quantize the kept weights to this many bits (2..8) on the final mask.
        quant: the quantizer for ``bits``: ``"gptq"`` or ``"obq"``.
        grid: how the per-row grid is fitted (with ``bits``).
        row_batch: rows per batch (default: sized from memory).
        dtype: working precision (default float64 on CPU, float32 on CUDA).

    Returns:
        SolveResult with ``weight`` (W's dtype and device), exact ``row_error`` under the undamped
        H (never above the warm start's, row by row), ``mask`` (True = kept), the grid with
        ``bits``, and ``info``: ``warm_start``, ``warm_error`` (rows,), ``swaps`` (rows,) swaps
        made per row, ``iht_iters`` run, ``reverted_rows`` (rows that kept the warm start).

    Raises:
        InvalidInputError: bad W, H, warm start or option (named subclasses: NonFiniteError,
            ShapeMismatchError, SparsityOutOfRangeError, NMPatternError, BitsOutOfRangeError).
        HessianNotPSDError: if the damped H restricted to a support cannot be factorised.
    """
    check_weight(W)
    rows, cols = W.shape
    check_hessian(H, cols)
    check_options(iht_iters, refresh, candidates, kernel_area, max_swaps, kimp, rtol, damp,
                   allocation, quant, bits)
    n_m, perm = column_order(n_m, cols, kernel_area, warm_start, sparsity)
    steps = _Steps(n_m, kimp, iht_iters, cols if max_swaps is None else max_swaps, refresh, rtol,
                   candidates)

    warm, warm_name = build_warm_start(W, H, sparsity, n_m, warm_start, allocation, kernel_area,
                                       damp, dtype)
    dev = W.device
    # the swap state is updated by rank-2 steps that drift in float32 on CPU over cols swaps
    wd = dtype if dtype is not None else (torch.float32 if W.is_cuda else torch.float64)
    perm_d = perm.to(dev)
    pb = _problem(W, H, warm, perm_d, damp, wd)
    R = row_batch or auto_row_batch(rows, cols, wd, dev, copies=1)
    masks, swaps, outs, iters = [], [], [], 0
    for s0 in range(0, rows, R):
        kb, sw, Vs, it = _refine_rows(pb, slice(s0, min(rows, s0 + R)), steps)
        masks.append(kb)
        swaps.append(sw)
        outs.append(Vs)
        iters = max(iters, it)
    W_hat = _unpermute(torch.cat(outs), perm_d).to(W.dtype)
    keep = _unpermute(torch.cat(masks), perm_d)
    W_hat, keep, err, worse = _never_worse(W, H, W_hat, keep, warm)
    info = {
        "method": "chita",
        "warm_start": warm_name,
        "warm_error": warm.row_error.detach().cpu().double(),
        "swaps": torch.cat(swaps).cpu(),
        "iht_iters": iters,
        "reverted_rows": int(worse.sum()),
    }
    if n_m is not None:
        info["pattern"] = f"{n_m[0]}:{n_m[1]}"
    if bits is None:
        return SolveResult(W_hat, err, mask=keep, info=info)
    qfn = gptq_quantize if quant == "gptq" else obq_quantize
    q = qfn(W_hat, H, bits, mask=keep, grid=grid, damp=damp, dtype=dtype)
    info.update(quant=quant, prune_error=err)
    return SolveResult(
        q.weight,
        row_errors(W, q.weight, H.to(dev)),
        mask=keep,
        scale=q.scale,
        zero=q.zero,
        bits=bits,
        info=info,
    )
