"""CHITA step 1: iterative hard thresholding with CHITA's line search (:mod:`.chita`).

On every row of a batch, ``v ← P(v − τ g)`` with ``g = A (v − w)`` and P the projection onto the
row's pattern (:func:`project`: the k_r largest |·| of its active set, or the N largest of every
group of M). The steps tried are the exact minimiser along −g on the support,
``τ* = ‖g_S‖² / g_Sᵀ A g_S``, and CHITA's search from ``τ_c``, the first step at which the kept
set can change, doubled at most :data:`STEP_DOUBLINGS` times while the thresholded objective keeps
dropping. A row moves only when the exact objective ``½ (w − v) A (w − v)ᵀ``
(:func:`objective`) drops.
"""

from __future__ import annotations

import torch

STEP_DOUBLINGS = 5  # CHITA's line search doubles τ_c at most this many times


def project(z: torch.Tensor, allowed: torch.Tensor, k: torch.Tensor | None, n_m) -> torch.Tensor:
    """Kept set of ``P(z)``: the largest |z| per row, or per N:M group.

    The ``k[r]`` largest |z| of the allowed coordinates of row r, or the N largest of every group of
    M consecutive coordinates. z, allowed: (R, d) → (R, d) bool.
    """
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


def objective(V: torch.Tensor, AV: torch.Tensor, AW: torch.Tensor, wAw: torch.Tensor):
    """``½ (w − v) A (w − v)ᵀ`` per row from ``AV = V A`` and ``AW = W A``."""
    return 0.5 * ((V * AV).sum(-1) + wAw) - (V * AW).sum(-1)


def iht(
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
    f = objective(v, AV, AW, wAw)
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
        kz = project(
            Z, allowed.repeat_interleave(C, 0), None if k is None else k.repeat_interleave(C), n_m
        )
        Z = Z * kz
        AZ = Z @ A
        fz = objective(
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
