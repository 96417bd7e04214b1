"""CHITA steps 2 and 3: swaps on the least-squares optimum of a support, then the backsolve.

On the optimum of a support S (``v_S = A_SS⁻¹ (A w)_S``), taking i out and j in changes the
objective by exactly

    Δ(i, j) = v_i² / (2 Σ_ii) − (g_j − v_i B_ji / Σ_ii)² / (2 (s_j + B_ji² / Σ_ii)),

with ``Σ = A_SS⁻¹``, ``B = A_PS Σ``, ``s_j = A_jj − A_jS Σ A_Sj`` (the Schur complement) and
``g_j = (A (v − w))_j`` on the pruned set P (docs/pruning.md §1). :func:`swap_batch` lets every
row of a batch take its best pair each round while Δ < 0 (N:M: i and j in the same group), the
state (:class:`_Swaps`) following each swap by rank-1 updates (:func:`_apply_swaps`) and rebuilt
from scratch every ``refresh`` rounds (:func:`_swap_setup`). :func:`backsolve` is the exact
optimum on a final support: one Cholesky of ``A_SS = H_SS + 2λI`` per row.

Supports and pruned sets are held as padded slot lists (:func:`~.lstsq._padded_support`); the
matrix gathers read A padded by one zero row and column (:func:`pad`), so padded slots read 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from automl_compress.solvers.lstsq import _cholesky_batched, _padded_support


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
    """Slot values x (R, K) at columns S (R, K) of a zero (R, d) matrix.

    Padded slots hold 0 and may share a column with a real slot, so the values are added, not
    assigned.
    """
    return torch.zeros((x.shape[0], d), dtype=x.dtype, device=x.device).scatter_add_(1, S, x)


def _block(A: torch.Tensor, I: torch.Tensor, Iv: torch.Tensor, J: torch.Tensor, Jv: torch.Tensor):
    """``A[I[r]][:, J[r]]`` for every row r (R, |I|, |J|), zero where a slot is padding.

    ``A`` is the padded matrix of :func:`pad` ((d+1, d+1), zero last row and column), so padded
    slots just point at index d.
    """
    d1 = A.shape[1]
    I = torch.where(Iv, I, d1 - 1)
    J = torch.where(Jv, J, d1 - 1)
    flat = (I[:, :, None] * d1 + J[:, None, :]).reshape(-1)
    return A.reshape(-1).index_select(0, flat).reshape(I.shape[0], I.shape[1], J.shape[1])


def pad(A: torch.Tensor) -> torch.Tensor:
    """A with a zero row and column appended, for the gathers of :func:`_block`."""
    return torch.nn.functional.pad(A, (0, 1, 0, 1))


def _factor(Ap: torch.Tensor, S: torch.Tensor, Sv: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factors of A_SS for every row (R, K, K).

    Identity on padded slots (``Ap``: A padded by :func:`pad`).
    """
    ASS = _block(Ap, S, Sv, S, Sv)
    ASS.diagonal(dim1=1, dim2=2).add_((~Sv).to(ASS.dtype))
    return _cholesky_batched(ASS, "A = H + 2λI restricted to a row's support")


def _support_optimum(Ap: torch.Tensor, AW: torch.Tensor, S: torch.Tensor, Sv: torch.Tensor):
    """The least-squares optimum on every row's support S.

    The Cholesky factor L of A_SS, ``b = (A w)_S`` and ``v_S = A_SS⁻¹ b`` (R, K each but L; zero on
    padded slots).
    """
    L = _factor(Ap, S, Sv)
    b = torch.gather(AW, 1, S) * Sv
    v = torch.cholesky_solve(b[:, :, None], L).squeeze(-1) * Sv
    return L, b, v


def _gather3(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[r, idx[r, a, b]]`` for x (R, K) and idx (R, p, q)."""
    R, p, q = idx.shape
    return x.gather(1, idx.reshape(R, p * q)).reshape(R, p, q)


def _swap_setup(A, Ap, AW, wAw, rows, S, Sv, P, Pv, n_m, n_cand) -> _Swaps:
    """The swap state from scratch for supports S; v is the exact backsolve of every row."""
    R, d = AW.shape
    K, Pn = S.shape[1], P.shape[1]
    L, b, v = _support_optimum(Ap, AW, S, Sv)
    Sig = torch.cholesky_inverse(L)
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
    """Swap S slot a (coordinate i, out) with P slot b (coordinate j, in), in place.

    Done in every row where ``act`` (the other rows are left as they are).

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


def swap_batch(A, Ap, AW, wAw, keep, n_m, max_swaps, refresh, rtol, n_cand):
    """Swaps on every row of a batch until none lowers a row's objective.

    Returns the final supports, the number of swaps of every row and the exact optimum (R, d) on the
    supports of the rows that made none (zero for the others).

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


def backsolve(Ap: torch.Tensor, AW: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The exact optimum ``v_S = A_SS⁻¹ (A w)_S`` on every row's support (R, d)."""
    R, d = keep.shape
    K = int(keep.sum(1).max())
    if K == 0:
        return torch.zeros_like(AW)
    S, Sv = _padded_support(keep, True, K)
    _, _, v = _support_optimum(Ap, AW, S, Sv)
    return _scatter(S, v, d)


def _write_support(out: torch.Tensor, st: _Swaps) -> None:
    m = torch.zeros((len(st.rows), out.shape[1]), dtype=torch.int64, device=out.device)
    out[st.rows] = m.scatter_add_(1, st.S, st.Sv.long()) > 0
