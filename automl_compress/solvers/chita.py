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

Rows run as batched tensor ops, the same code on CPU and CUDA. A row whose error under the undamped
H would end above its warm start's keeps the warm start, so the result is never worse.

Example (2 columns, keep 1; the warm start keeps the larger weight, the wrong one here)::

    >>> import torch
    >>> W = torch.tensor([[1.0, 0.9]], dtype=torch.float64)
    >>> H = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    >>> res = chita_prune(W, H, warm_start=torch.tensor([[True, False]]), damp=0.0)
    >>> res.mask.tolist(), round(res.error, 3)
    ([[False, True]], 0.5)
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from automl_compress.errors import InvalidInputError, NMPatternError, ShapeMismatchError
from automl_compress.solvers.checks import (
    check_bits,
    check_hessian,
    check_n_m,
    check_sparsity,
    check_weight,
)
from automl_compress.solvers.exact_obs import channel_major_perm, exact_obs_prune
from automl_compress.solvers.gptq import gptq_quantize
from automl_compress.solvers.hessian import DEFAULT_DAMP, prepare_hessian, row_errors
from automl_compress.solvers.lstsq import _cholesky_batched, _padded_support, resolve_on_mask
from automl_compress.solvers.numerics import auto_row_batch
from automl_compress.solvers.obq import obq_quantize
from automl_compress.solvers.quantizer import GridSpec
from automl_compress.solvers.result import SolveResult
from automl_compress.solvers.sparsegpt import sparsegpt_prune

WARM_STARTS = ("exact_obs", "sparsegpt")
QUANTIZERS = ("gptq", "obq")
DEFAULT_IHT_ITERS = 5
DEFAULT_KIMP = 1.5
DEFAULT_REFRESH = 64
DEFAULT_RTOL = 1e-6
DEFAULT_CANDIDATES = 16
STEP_DOUBLINGS = 5  # CHITA's line search doubles τ_c at most this many times


# ----------------------------------------------------------------------------------------------
# projection onto the pattern


def _project(z: torch.Tensor, allowed: torch.Tensor, k: torch.Tensor | None, n_m) -> torch.Tensor:
    """Kept set of ``P(z)``: the ``k[r]`` largest |z| of the allowed coordinates of row r, or the N
    largest of every group of M consecutive coordinates. z, allowed: (R, d) → (R, d) bool."""
    mag = z.abs().masked_fill(~allowed, -1.0)
    R, d = z.shape
    if n_m is not None:
        n, m = n_m
        top = mag.reshape(R, d // m, m).topk(n, dim=2).indices
        return torch.zeros((R, d // m, m), dtype=torch.bool, device=z.device).scatter_(
            2, top, True
        ).reshape(R, d)
    # threshold at each row's k-th largest value; exact unless values tie at the threshold
    kk = k.clamp(1, d)[:, None]
    thr = mag.sort(dim=1, descending=True).values.gather(1, kk - 1)
    keep = (mag >= thr) & allowed & (k[:, None] > 0)
    if bool((keep.sum(1) != torch.minimum(k, allowed.sum(1))).any()):
        order = torch.argsort(mag, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(d, device=z.device).expand(R, d).contiguous()
        )
        keep = rank < k[:, None]
    return keep


def _objective(V: torch.Tensor, AV: torch.Tensor, AW: torch.Tensor, wAw: torch.Tensor):
    """``½ (w − v) A (w − v)ᵀ`` per row from ``AV = V A`` and ``AW = W A``."""
    return 0.5 * ((V * AV).sum(-1) + wAw) - (V * AW).sum(-1)


# ----------------------------------------------------------------------------------------------
# 1. IHT with CHITA's line search


def _iht(
    A: torch.Tensor,
    AW: torch.Tensor,
    wAw: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    allowed: torch.Tensor,
    k: torch.Tensor | None,
    n_m,
    iters: int,
    rtol: float,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """IHT steps on every row of v (R, d) until no row's objective drops (or ``iters``).

    Returns the new weights, their support and the number of iterations run.
    """
    R, d = v.shape
    tiny = torch.finfo(v.dtype).tiny
    # fallback step 1/L with L from Gershgorin's bound on the largest eigenvalue of A
    tau_L = 1.0 / float(A.abs().sum(1).max().clamp_min(tiny))
    mult = 2.0 ** torch.arange(STEP_DOUBLINGS + 1, dtype=v.dtype, device=v.device)
    AV = v @ A
    f = _objective(v, AV, AW, wAw)
    done = torch.zeros(R, dtype=torch.bool, device=v.device)
    it = 0
    while it < iters:
        it += 1
        g = AV - AW  # (R, d) gradient of ½(v−w)A(v−w)
        gS = g * keep
        gg = (gS * gS).sum(1)
        curv = ((gS @ A) * gS).sum(1)
        tau_opt = torch.where(curv > tiny, gg / curv.clamp_min(tiny), torch.zeros_like(gg))
        # τ_c: the smallest step at which an outside coordinate can overtake a kept one
        out_g = (g.abs() * (allowed & ~keep)).to(v.dtype)
        if n_m is not None:
            m = n_m[1]
            gmax = out_g.reshape(R, d // m, m).amax(2).repeat_interleave(m, dim=1)
        else:
            gmax = out_g.amax(1, keepdim=True).expand(R, d)
        same = torch.sign(v) == torch.sign(g)
        den = torch.where(same, g.abs() + gmax, gmax - g.abs())
        ok = keep & (den > 0)
        tau_c = torch.where(ok, v.abs() / den.clamp_min(tiny), torch.inf).amin(1)
        good = torch.isfinite(tau_c) & (tau_c > 0)
        tau_c = torch.where(good, tau_c, torch.full_like(tau_c, tau_L))
        taus = torch.cat([tau_opt[:, None], tau_c[:, None] * mult[None, :]], 1)  # (R, C)
        C = taus.shape[1]
        Z = (v[:, None, :] - taus[:, :, None] * g[:, None, :]).reshape(R * C, d)  # (R·C, d)
        kz = _project(
            Z, allowed.repeat_interleave(C, 0), None if k is None else k.repeat_interleave(C), n_m
        )
        Z = Z * kz
        AZ = Z @ A
        fz = _objective(
            Z, AZ, AW.repeat_interleave(C, 0), wAw.repeat_interleave(C)
        ).reshape(R, C)
        # CHITA's rule: double τ_c while the thresholded objective keeps dropping
        best_f, best_c = fz[:, 0].clone(), torch.zeros(R, dtype=torch.int64, device=v.device)
        run_f = f.clone()
        alive = torch.ones(R, dtype=torch.bool, device=v.device)
        for c in range(1, C):
            alive &= fz[:, c] < run_f
            run_f = torch.where(alive, fz[:, c], run_f)
            better = alive & (fz[:, c] < best_f)
            best_f = torch.where(better, fz[:, c], best_f)
            best_c = torch.where(better, c, best_c)
        move = (best_f < f - rtol * f.abs()) & ~done
        done |= ~move
        if not bool(move.any()):
            break
        pick = (torch.arange(R, device=v.device) * C + best_c)[move]
        rows = move.nonzero().squeeze(1)
        v = v.index_copy(0, rows, Z[pick])
        AV = AV.index_copy(0, rows, AZ[pick])
        keep = keep.index_copy(0, rows, kz[pick])
        f = torch.where(move, best_f, f)
    return v, keep, it


# ----------------------------------------------------------------------------------------------
# 2. swaps


@dataclass
class _Swaps:
    """Swap state of a row batch.

    S slots (R, K) hold the support, P slots (R, Pn) the pruned set; padded slots are invalid.
    ``Sig`` = A_SS⁻¹ (identity on padding), ``v`` the optimum on S, ``s`` the Schur complements and
    ``g`` the gradient on P, ``f`` the objective, ``rows`` the rows of the batch. ``E`` (R, p, q)
    holds the entries of B = A_PS Σ that the swap scores need: B[ps[r, x], ss[r, x, y]]. For N:M,
    every P slot with the N S slots of its group; unstructured, a pool of the c P slots of largest
    gain with every S slot (``fresh``: the pool was chosen at the current point).
    """

    rows: torch.Tensor
    S: torch.Tensor
    Sv: torch.Tensor
    P: torch.Tensor
    Pv: torch.Tensor
    Sig: torch.Tensor
    v: torch.Tensor
    s: torch.Tensor
    g: torch.Tensor
    f: torch.Tensor
    ps: torch.Tensor
    ss: torch.Tensor
    E: torch.Tensor
    fresh: torch.Tensor

    def take(self, idx: torch.Tensor) -> _Swaps:
        return _Swaps(**{f.name: getattr(self, f.name).index_select(0, idx) for f in fields(self)})

    def put(self, idx: torch.Tensor, sub: _Swaps) -> None:
        for f in fields(self):
            getattr(self, f.name).index_copy_(0, idx, getattr(sub, f.name))


def _scatter(S: torch.Tensor, x: torch.Tensor, d: int) -> torch.Tensor:
    """Slot values x (R, K) at columns S (R, K) of a zero (R, d) matrix. Padded slots hold 0 and
    may share a column with a real slot, so the values are added, not assigned."""
    return torch.zeros((x.shape[0], d), dtype=x.dtype, device=x.device).scatter_add_(1, S, x)


def _block(A: torch.Tensor, I: torch.Tensor, Iv: torch.Tensor, J: torch.Tensor, Jv: torch.Tensor):
    """``A[I[r]][:, J[r]]`` for every row r (R, |I|, |J|), zero where a slot is padding.

    ``A`` is the padded matrix of :func:`_pad` ((d+1, d+1), zero last row and column), so padded
    slots just point at index d.
    """
    d1 = A.shape[1]
    I = torch.where(Iv, I, d1 - 1)
    J = torch.where(Jv, J, d1 - 1)
    flat = (I[:, :, None] * d1 + J[:, None, :]).reshape(-1)
    return A.reshape(-1).index_select(0, flat).reshape(I.shape[0], I.shape[1], J.shape[1])


def _pad(A: torch.Tensor) -> torch.Tensor:
    """A with a zero row and column appended, for the gathers of :func:`_block`."""
    return torch.nn.functional.pad(A, (0, 1, 0, 1))


def _factor(Ap: torch.Tensor, S: torch.Tensor, Sv: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factors of A_SS for every row (R, K, K), identity on padded slots
    (``Ap``: A padded by :func:`_pad`)."""
    ASS = _block(Ap, S, Sv, S, Sv)
    ASS.diagonal(dim1=1, dim2=2).add_((~Sv).to(ASS.dtype))
    return _cholesky_batched(ASS, "A = H + 2λI restricted to a row's support")


def _gather3(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[r, idx[r, a, b]]`` for x (R, K) and idx (R, p, q)."""
    R, p, q = idx.shape
    return x.gather(1, idx.reshape(R, p * q)).reshape(R, p, q)


def _swap_setup(A, Ap, AW, wAw, rows, S, Sv, P, Pv, n_m, n_cand) -> _Swaps:
    """The swap state from scratch for supports S; v is the exact backsolve of every row."""
    R, d = AW.shape
    K, Pn = S.shape[1], P.shape[1]
    L = _factor(Ap, S, Sv)
    Sig = torch.cholesky_inverse(L)
    b = torch.gather(AW, 1, S) * Sv
    v = torch.cholesky_solve(b[:, :, None], L).squeeze(-1) * Sv
    g = torch.gather(_scatter(S, v, d) @ A - AW, 1, P) * Pv
    ASP = _block(Ap, S, Sv, P, Pv)  # (R, K, Pn)
    Z = torch.linalg.solve_triangular(L, ASP, upper=False)
    s = torch.where(Pv, torch.diagonal(A)[P] - (Z * Z).sum(1), 1.0)
    f = 0.5 * (wAw - (v * b).sum(1))
    dev = A.device
    if n_m is not None:
        n, m = n_m
        ps = torch.arange(Pn, device=dev).expand(R, Pn).contiguous()
        ss = ((ps // (m - n))[:, :, None] * n + torch.arange(n, device=dev)).contiguous()
        E = torch.bmm(ASP.transpose(1, 2), Sig).gather(2, ss)  # (R, Pn, N)
        fresh = torch.ones(R, dtype=torch.bool, device=dev)
        return _Swaps(rows, S, Sv, P, Pv, Sig, v, s, g, f, ps, ss, E, fresh)
    c = min(n_cand, Pn)
    ss = torch.arange(K, device=dev).expand(R, c, K).contiguous()
    ps = torch.zeros((R, c), dtype=torch.int64, device=dev)
    st = _Swaps(rows, S, Sv, P, Pv, Sig, v, s, g, f, ps, ss, ss.to(A.dtype), ps[:, 0] == 0)
    _refresh_pool(st, Ap)
    return st


def _refresh_pool(st: _Swaps, Ap: torch.Tensor) -> None:
    """Unstructured: the pool := the c P slots of largest gain g_j²/(2 s_j), with their rows of B.

    Δ(i, j) >= −g_j²/(2 s_j) (S − i + j is a subset of S + j), so only high-gain j can give a
    large drop.
    """
    gain = torch.where(st.Pv, st.g * st.g / (2 * st.s), -1.0)
    st.ps = gain.topk(st.ps.shape[1], dim=1).indices
    J = torch.gather(st.P, 1, st.ps)
    st.E = torch.bmm(_block(Ap, J, torch.gather(st.Pv, 1, st.ps), st.S, st.Sv), st.Sig)
    st.fresh = torch.ones_like(st.fresh)


def _best_swaps(st: _Swaps):
    """Every row's best pair of S slot a and P slot b among the entries of E, and its exact Δ."""
    R = st.v.shape[0]
    sd = torch.diagonal(st.Sig, dim1=1, dim2=2)
    rem = st.v * st.v / (2 * sd)
    gE = torch.gather(st.g, 1, st.ps)[:, :, None]
    sE = torch.gather(st.s, 1, st.ps)[:, :, None]
    sdE = _gather3(sd, st.ss)
    num = gE - _gather3(st.v / sd, st.ss) * st.E
    D = _gather3(rem, st.ss) - num * num / (2 * (sE + st.E * st.E / sdE))
    ok = torch.gather(st.Pv, 1, st.ps)[:, :, None] & _gather3(st.Sv, st.ss)
    best, arg = D.masked_fill(~ok, torch.inf).reshape(R, -1).min(1)
    q = st.ss.shape[2]
    x = arg // q
    a = st.ss.reshape(R, -1).gather(1, arg[:, None]).squeeze(1)
    b = st.ps.gather(1, x[:, None]).squeeze(1)
    return best, a, b, x


def _apply_swaps(st: _Swaps, A: torch.Tensor, a, b, x, act) -> None:
    """Swap S slot a (coordinate i, out) with P slot b (coordinate j, in) in every row where
    ``act``, in place (the other rows are left as they are).

    Removing i is an OBS step on the support and adding j a bordered inverse; Σ takes both as one
    rank-2 update, and the vectors on P need the columns A·Σ[:, a] and A·(Σ A_Sj − e_a) of B and
    of the new Schur complements: one GEMM with the shared A for all rows.
    """
    R, K = st.v.shape
    d = A.shape[0]
    ar = torch.arange(R, device=A.device)
    on = act.to(A.dtype)
    sa = st.Sig[ar, a]  # (R, K) row a of Σ
    saa = torch.where(act, sa[ar, a], 1.0)
    va = st.v[ar, a] * on
    i, j = st.S[ar, a], st.P[ar, b]
    if st.ss.shape[2] == K:  # the pool row of j is the whole row of B
        u = st.E[ar, x]
    else:
        Asj = torch.gather(A.index_select(0, j), 1, st.S) * st.Sv
        u = torch.bmm(st.Sig, Asj[:, :, None]).squeeze(-1)
    Bja = u[ar, a]
    e = u - (Bja / saa)[:, None] * sa  # row j of B once i is out (0 at slot a) ...
    e[ar, a] = -1.0  # ... minus e_a
    sa, e = sa * on[:, None], e * on[:, None]
    sj = torch.where(act, st.s[ar, b] + Bja * Bja / saa, 1.0)
    gj = (st.g[ar, b] - (va / saa) * Bja) * on
    S_old, P_old = st.S.clone(), st.P.clone()
    st.S[ar, a] = torch.where(act, j, i)
    st.P[ar, b] = torch.where(act, i, j)
    Y = torch.cat([_scatter(S_old, sa, d), _scatter(st.S, e, d)]) @ A  # (2R, d)
    Ba = torch.gather(Y[:R], 1, P_old) * st.Pv  # B[:, a] = A_PS Σ[:, a]
    r = -torch.gather(Y[R:], 1, st.P) * st.Pv  # A_Pj − A_PS' u'
    t = -gj / sj
    # E: remove i, give slot b the row of i, add j
    saE = _gather3(sa / saa[:, None], st.ss)
    st.E.sub_(torch.gather(Ba, 1, st.ps)[:, :, None] * saE)
    at_b = ((st.ps == b[:, None]) & act[:, None])[:, :, None]
    st.E.copy_(torch.where(at_b & (st.ss != a[:, None, None]), -saE, torch.where(at_b, 0.0, st.E)))
    st.E.sub_(torch.gather(r, 1, st.ps)[:, :, None] * _gather3(e / sj[:, None], st.ss))
    # vectors on P: remove i, then i takes P slot b, then add j
    st.g.sub_((va / saa)[:, None] * Ba)
    st.s.add_(Ba * Ba / saa[:, None])
    st.g[ar, b] = torch.where(act, -va / saa, st.g[ar, b])
    st.s[ar, b] = torch.where(act, 1.0 / saa, st.s[ar, b])
    st.g.add_(t[:, None] * r)
    st.s.sub_(r * r / sj[:, None])
    st.s.masked_fill_(~st.Pv, 1.0)
    st.g.masked_fill_(~st.Pv, 0.0)
    st.v.sub_((va / saa)[:, None] * sa + t[:, None] * e)
    X = torch.stack([sa, e], 2)  # (R, K, 2)
    Xs = torch.stack([-sa / saa[:, None], e / sj[:, None]], 1)  # (R, 2, K)
    st.Sig.baddbmm_(X, Xs)


def _swap_batch(A, Ap, AW, wAw, keep, n_m, max_swaps, refresh, rtol, n_cand):
    """Swaps on every row of a batch until none lowers a row's objective; returns the final
    supports, the number of swaps of every row and the exact optimum (R, d) on the supports of
    the rows that made none (zero for the others).

    Unstructured, a row whose pool (chosen at an earlier point) holds no improving pair gets a
    new pool and one more try; it stops when a fresh pool holds none. Stopped rows leave the
    batch once they are a quarter of it.
    """
    R, d = keep.shape
    dev = keep.device
    nk = keep.sum(1)
    swaps = torch.zeros(R, dtype=torch.int64, device=dev)
    if max_swaps == 0 or not bool(((nk > 0) & (nk < d)).any()):
        return keep, swaps, None
    K = int(nk.max())
    Pn = d - int(nk.min())
    S, Sv = _padded_support(keep, True, K)
    P, Pv = _padded_support(keep, False, Pn)
    out = keep.clone()
    st = _swap_setup(A, Ap, AW, wAw, torch.arange(R, device=dev), S, Sv, P, Pv, n_m, n_cand)
    V0 = _scatter(S, st.v, d)
    stopped = torch.zeros(R, dtype=torch.bool, device=dev)
    stale = False
    for rnd in range(max_swaps):
        if rnd and rnd % refresh == 0:
            r_ = st.rows
            st = _swap_setup(A, Ap, AW[r_], wAw[r_], r_, st.S, st.Sv, st.P, st.Pv, n_m, n_cand)
        elif stale:
            _refresh_pool(st, Ap)
        best, a, b, x = _best_swaps(st)
        act = (best < -rtol * st.f.abs().clamp_min(torch.finfo(best.dtype).tiny)) & ~stopped
        stopped |= ~act & st.fresh
        n_stop = int(stopped.sum())
        if n_stop == len(stopped):
            break
        if 4 * n_stop >= len(stopped):
            _write_support(out, st.take(stopped.nonzero().squeeze(1)))
            idx = (~stopped).nonzero().squeeze(1)
            st, best, a, b, x, act = st.take(idx), best[idx], a[idx], b[idx], x[idx], act[idx]
            stopped = stopped[idx]
        stale = bool((~act & ~stopped).any())  # rows waiting for a new pool
        _apply_swaps(st, A, a, b, x, act)
        st.f.add_(torch.where(act, best, 0.0))
        swaps[st.rows] += act.long()
        if n_m is None:
            st.fresh = ~act
    _write_support(out, st)
    return out, swaps, V0 * (swaps == 0)[:, None]


def _backsolve(Ap: torch.Tensor, AW: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The exact optimum ``v_S = A_SS⁻¹ (A w)_S`` on every row's support (R, d)."""
    R, d = keep.shape
    K = int(keep.sum(1).max())
    if K == 0:
        return torch.zeros_like(AW)
    S, Sv = _padded_support(keep, True, K)
    L = _factor(Ap, S, Sv)
    v = torch.cholesky_solve((torch.gather(AW, 1, S) * Sv)[:, :, None], L).squeeze(-1)
    return _scatter(S, v * Sv, d)


def _write_support(out: torch.Tensor, st: _Swaps) -> None:
    m = torch.zeros((len(st.rows), out.shape[1]), dtype=torch.int64, device=out.device)
    out[st.rows] = m.scatter_add_(1, st.S, st.Sv.long()) > 0


# ----------------------------------------------------------------------------------------------
# public entry point


def _warm(W, H, sparsity, n_m, warm_start, allocation, kernel_area, damp, dtype):
    """The warm start's SolveResult (weights and per-row errors) and its name."""
    if isinstance(warm_start, SolveResult):
        if warm_start.mask is None:
            raise InvalidInputError(
                "warm_start must be a pruning result with a mask, found a dense SolveResult; pass "
                "the result of exact_obs_prune or sparsegpt_prune"
            )
        _check_mask(warm_start.mask, W, n_m, kernel_area)
        err = warm_start.row_error
        if err is None:
            err = row_errors(W, warm_start.weight, H)
        res = SolveResult(warm_start.weight, err.to(W.device), mask=warm_start.mask.to(W.device))
        return res, str(warm_start.info.get("method", "result"))
    if isinstance(warm_start, torch.Tensor):
        _check_mask(warm_start, W, n_m, kernel_area)
        return resolve_on_mask(W, H, warm_start.to(W.device), damp, dtype=dtype), "mask"
    if warm_start == "exact_obs":
        kw = {"n_m": n_m} if n_m is not None else {"sparsity": sparsity, "allocation": allocation}
        res = exact_obs_prune(W, H, kernel_area=kernel_area, damp=damp, dtype=dtype, **kw)
        return res, "exact_obs"
    if warm_start == "sparsegpt":
        kw = {"n_m": n_m} if n_m is not None else {"sparsity": sparsity}
        return sparsegpt_prune(W, H, kernel_area=kernel_area, damp=damp, dtype=dtype, **kw), (
            "sparsegpt"
        )
    raise InvalidInputError(
        f"warm_start must be one of {WARM_STARTS}, a (rows, cols) bool mask or a pruning "
        f"SolveResult, found {warm_start!r}"
    )


def _check_mask(mask, W, n_m, kernel_area) -> None:
    if not isinstance(mask, torch.Tensor) or mask.shape != W.shape or mask.dtype != torch.bool:
        found = (tuple(mask.shape), mask.dtype) if isinstance(mask, torch.Tensor) else type(mask)
        raise ShapeMismatchError(
            f"warm-start mask must be a bool tensor of W's shape {tuple(W.shape)}, found "
            f"{found}; pass result.mask of a pruning solver (True = kept)"
        )
    if n_m is not None:
        n, m = n_m
        perm = channel_major_perm(W.shape[1], kernel_area).to(mask.device)
        per_group = mask[:, perm].reshape(W.shape[0], -1, m).sum(2)
        if not bool((per_group == n).all()):
            raise NMPatternError(
                f"warm-start mask must keep exactly {n} of every {m} weights (along input "
                f"channels, kernel_area {kernel_area}), found group counts from "
                f"{int(per_group.min())} to {int(per_group.max())}"
            )


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidInputError(f"{name} must be an int >= {low}, found {value!r}")


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
    _check_int("iht_iters", iht_iters, 0)
    _check_int("refresh", refresh, 1)
    _check_int("candidates", candidates, 1)
    _check_int("kernel_area", kernel_area, 1)
    if max_swaps is not None:
        _check_int("max_swaps", max_swaps, 0)
    if isinstance(kimp, bool) or not isinstance(kimp, (int, float)) or not kimp >= 1.0:
        raise InvalidInputError(f"kimp must be a number >= 1, found {kimp!r}")
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0.0 <= rtol < 1.0:
        raise InvalidInputError(f"rtol must be a number in [0, 1), found {rtol!r}")
    if not isinstance(damp, (int, float)) or not 0.0 <= damp < 10.0:
        raise InvalidInputError(f"damp must be a number in [0, 10), found {damp!r}")
    if allocation not in ("global", "uniform"):
        raise InvalidInputError(f"allocation must be 'global' or 'uniform', found {allocation!r}")
    if quant not in QUANTIZERS:
        raise InvalidInputError(f"quant must be one of {QUANTIZERS}, found {quant!r}")
    if bits is not None:
        check_bits(bits, allow_zero=False)
    perm = torch.arange(cols)
    if n_m is not None:
        n_m = check_n_m(n_m, cols)
        perm = channel_major_perm(cols, kernel_area)
        if (cols // kernel_area) % n_m[1]:
            raise NMPatternError(
                f"N:M {n_m[0]}:{n_m[1]} runs along input channels, so C_in = {cols // kernel_area}"
                f" (cols {cols} / kernel_area {kernel_area}) must be a multiple of {n_m[1]}; use "
                "unstructured sparsity for this layer"
            )
    elif not isinstance(warm_start, (torch.Tensor, SolveResult)):
        check_sparsity(sparsity)
    max_swaps = cols if max_swaps is None else max_swaps

    warm, warm_name = _warm(W, H, sparsity, n_m, warm_start, allocation, kernel_area, damp, dtype)
    dev = W.device
    # the swap state is updated by rank-2 steps that drift in float32 on CPU over cols swaps
    wd = dtype if dtype is not None else (torch.float32 if W.is_cuda else torch.float64)
    perm_d = perm.to(dev)
    prep = prepare_hessian(H.to(dev)[perm_d][:, perm_d], damp)
    A = prep.H.to(wd)  # H + 2λI (dead inputs neutralised)
    Ap = _pad(A)
    Wk = W[:, perm_d].to(wd).masked_fill(prep.dead[None, :], 0.0)
    keep0 = warm.mask.to(dev)[:, perm_d]
    V0 = warm.weight.to(dev)[:, perm_d].to(wd).masked_fill(~keep0, 0.0)
    k = keep0.sum(1)
    R = row_batch or auto_row_batch(rows, cols, wd, dev, copies=1)

    masks, swaps, outs, iters = [], [], [], 0
    for s0 in range(0, rows, R):
        sl = slice(s0, min(rows, s0 + R))
        Wb, Vb, kb = Wk[sl], V0[sl], keep0[sl]
        AW = Wb @ A
        wAw = (Wb * AW).sum(1)
        allowed = torch.ones_like(kb)
        if n_m is None:
            # active set: the support plus the best outside coordinates by g_j² / A_jj
            g = Vb @ A - AW
            score = (g * g / torch.diagonal(A)).masked_fill(kb, torch.inf)
            ka = torch.clamp(torch.ceil(kimp * k[sl].to(wd)).long(), max=cols)
            allowed = _project(score, torch.ones_like(kb), ka, None)
        kbn = None if n_m is not None else k[sl]
        if iht_iters:
            Vb, kb, it = _iht(A, AW, wAw, Vb, kb, allowed, kbn, n_m, iht_iters, rtol)
            iters = max(iters, it)
        kb, sw, Vs = _swap_batch(A, Ap, AW, wAw, kb, n_m, max_swaps, refresh, rtol, candidates)
        # 3. exact backsolve on the final support (done already for rows that made no swap)
        moved = sw > 0
        if Vs is None:
            Vs = _backsolve(Ap, AW, kb)
        elif bool(moved.any()):
            Vs[moved] = _backsolve(Ap, AW[moved], kb[moved])
        masks.append(kb)
        swaps.append(sw)
        outs.append(Vs)
    keep_p = torch.cat(masks)
    W_hat_p = torch.cat(outs)

    W_hat = torch.empty_like(W_hat_p)
    W_hat[:, perm_d] = W_hat_p
    keep = torch.empty_like(keep_p)
    keep[:, perm_d] = keep_p
    W_hat = W_hat.to(W.dtype)
    err = row_errors(W, W_hat, H.to(dev))
    worse = err > warm.row_error.to(dev)
    if bool(worse.any()):
        W_hat = torch.where(worse[:, None], warm.weight.to(dev, W.dtype), W_hat)
        keep = torch.where(worse[:, None], warm.mask.to(dev), keep)
        err = torch.where(worse, warm.row_error.to(dev, torch.float64), err)
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
