"""ExactOBS pruning: greedy optimal brain surgeon, one weight (or block) at a time, per row.

ALGORITHMS.md §1.1–1.6. Every row is an independent quadratic problem with the shared H. For each
row the greedy step removes the coordinate ``p = argmin w_p² / [H⁻¹]_pp``, compensates the free
weights with ``δ = −(w_p / [H⁻¹]_pp) · H⁻¹[p, :]`` and downdates the row's inverse with the rank-1
update ``H⁻¹ −= H⁻¹[:, p] H⁻¹[p, :] / [H⁻¹]_pp`` (§0.2). Rows run in batches, with no host syncs in
the step loop (removed or closed coordinates get +inf scores).

Lazy downdates (§1.2): the greedy choice needs only the current diagonal (kept up to date in O(d))
and the pivot row (the stored matrix minus the pending rank-1 factors ``u = row / √pivot``). The
pending factors are flushed into the stored matrix every ``lazy_rank`` steps by one batched GEMM.
The order is the same as with eager downdates up to rounding (tested).

Unstructured: one pass to full sparsity stores each row's order and per-step losses only; the
weights at any level are rebuilt as the exact least-squares optimum on the kept support by order
reconstruction (:func:`automl_compress.solvers.lstsq.replay_order`, §1.4). Per-row zero counts for
a layer sparsity come from the rows' cumulative loss curves (§1.3): greedy over each row's lower
convex hull, then single-unit exchanges between rows until no exchange lowers the layer error.

N:M (§1.5): the same loop, a group holding its quota of zeros is closed. Blocks (§1.6): group OBS on
c×c diagonal blocks of H⁻¹. For conv layers (columns ordered (C_in, kh, kw)) ``kernel_area = kh·kw``
makes N:M groups and blocks run along input channels at a fixed kernel tap (§0.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from automl_compress.errors import InvalidInputError, NMPatternError, ShapeMismatchError
from automl_compress.solvers.checks import check_hessian, check_n_m, check_sparsity, check_weight
from automl_compress.solvers.hessian import (
    DEFAULT_DAMP,
    inverse_hessian,
    prepare_hessian,
    row_errors,
)
from automl_compress.solvers.lstsq import auto_row_batch, replay_order, solve_dtype
from automl_compress.solvers.result import SolveResult

DEFAULT_LAZY_RANK = 32
ALLOCATIONS = ("global", "uniform")


# ----------------------------------------------------------------------------------------------
# column permutation for conv layers


def channel_major_perm(cols: int, kernel_area: int) -> torch.Tensor:
    """Permutation taking (C_in, kh, kw) column order to (kh, kw, C_in) order.

    ``W[:, perm]`` has every run of consecutive columns at one kernel tap over input channels.

    Raises:
        ShapeMismatchError: if ``cols`` is not a multiple of ``kernel_area``.
    """
    if not isinstance(kernel_area, int) or kernel_area < 1:
        raise InvalidInputError(f"kernel_area must be an int >= 1, found {kernel_area!r}")
    if cols % kernel_area:
        raise ShapeMismatchError(
            f"kernel_area = {kernel_area} must divide cols = {cols} (columns ordered "
            "(C_in, kh, kw)); pass kernel_area = kh·kw of the conv, or 1 for Linear layers"
        )
    c_in = cols // kernel_area
    return torch.arange(cols).reshape(c_in, kernel_area).T.reshape(-1)


# ----------------------------------------------------------------------------------------------
# greedy passes (one row batch)


def _compact_symmetric(base: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``base[r][keep[r]][:, keep[r]]`` for every r of a batch of symmetric matrices (R, n, n).

    Two row selections (contiguous copies) with a transpose between them, using the symmetry.
    """
    R, n, _ = base.shape
    k = keep.shape[1]
    flat = (torch.arange(R, device=base.device)[:, None] * n + keep).reshape(-1)
    rows = base.reshape(R * n, n).index_select(0, flat).reshape(R, k, n)
    return rows.transpose(1, 2).reshape(R * n, k).index_select(0, flat).reshape(R, k, k)


def _greedy_batch(
    w: torch.Tensor,
    Hinv: torch.Tensor,
    steps: int,
    lazy_rank: int,
    n_m: tuple[int, int] | None,
    compact: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ExactOBS greedy elimination of ``steps`` coordinates of every row of ``w`` (R, d).

    Works on an *active set*: at a flush, once at least max(lazy_rank, d_active/8) coordinates were
    removed since the last compaction, the removed ones are dropped, so later steps touch about
    (d − t)² entries instead of d² (every row removes exactly one coordinate per step, so the
    active sets stay the same size across rows). ``idx`` maps active
    slots to original columns.

    Returns the order (R, steps) in original columns, the step losses (R, steps) and the final
    weights (R, d), zero on the removed coordinates.
    """
    R, d = w.shape
    dev, dt = w.device, w.dtype
    w_full = w
    w = w.clone()
    base = Hinv.expand(R, d, d).clone()
    diag = torch.diagonal(Hinv).expand(R, d).clone()
    idx = torch.arange(d, device=dev).expand(R, d).contiguous()
    B = max(1, min(lazy_rank, steps))
    Up = torch.zeros((R, B, d), dtype=dt, device=dev)
    removed = torch.zeros((R, d), dtype=torch.bool, device=dev)
    blocked = removed
    order = torch.empty((R, steps), dtype=torch.int64, device=dev)
    losses = torch.empty((R, steps), dtype=dt, device=dev)
    ar = torch.arange(R, device=dev)
    tiny = torch.finfo(dt).tiny
    if n_m is not None:
        n, m = n_m
        quota = m - n
        zeros_in_group = torch.zeros((R, d // m), dtype=torch.int64, device=dev)
        group_of = torch.arange(d, device=dev).expand(R, d) // m  # group of every active slot
        one = torch.ones((R, 1), dtype=torch.int64, device=dev)
    j = 0
    compacted_at = 0
    for t in range(steps):
        score = (w * w / diag.clamp_min(tiny)).masked_fill(blocked, float("inf"))
        p = score.argmin(dim=1)
        pc = p[:, None]
        order[:, t] = idx.gather(1, pc).squeeze(1)
        losses[:, t] = 0.5 * score.gather(1, pc).squeeze(1)
        row = base[ar, p]
        if j:
            coef = Up[:, :j].gather(2, pc[:, None, :].expand(R, j, 1))
            row = row - torch.bmm(coef.transpose(1, 2), Up[:, :j]).squeeze(1)
        piv = row.gather(1, pc).clamp_min(tiny)
        w = w - (w.gather(1, pc) / piv) * row
        w.scatter_(1, pc, 0.0)
        u = row / piv.sqrt()
        Up[:, j] = u
        j += 1
        diag = diag - u * u
        removed = removed.scatter(1, pc, True)
        if n_m is not None:
            zeros_in_group.scatter_add_(1, group_of.gather(1, pc), one)
            blocked = removed | (zeros_in_group >= quota).gather(1, group_of)
        else:
            blocked = removed
        if j == B:
            base.baddbmm_(Up.transpose(1, 2), Up, alpha=-1.0)
            Up.zero_()
            j = 0
            since = t + 1 - compacted_at
            dc = base.shape[1] - since
            if compact and since >= max(B, base.shape[1] // 8) and dc > 0 and t + 1 < steps:
                # drop the removed slots (the same number in every row), keeping the others in
                # order; the sort key is on the device, so there is no host sync
                keep = torch.argsort(removed.to(torch.int8), dim=1, stable=True)[:, :dc]
                base = _compact_symmetric(base, keep)
                w, diag, idx = w.gather(1, keep), diag.gather(1, keep), idx.gather(1, keep)
                removed = torch.zeros((R, dc), dtype=torch.bool, device=dev)
                if n_m is not None:
                    group_of = group_of.gather(1, keep)
                    blocked = (zeros_in_group >= quota).gather(1, group_of)
                else:
                    blocked = removed
                Up = torch.zeros((R, B, dc), dtype=dt, device=dev)
                compacted_at = t + 1
    out = torch.zeros_like(w_full).scatter_(1, idx, w.masked_fill(removed, 0.0))
    return order, losses, out


def _block_batch(
    w: torch.Tensor, Hinv: torch.Tensor, c: int, lazy_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-OBS elimination of all blocks of c consecutive columns of every row of ``w`` (R, d).

    The rank-c downdate ``H⁻¹ −= H⁻¹[:, B] (H⁻¹_BB)⁻¹ H⁻¹[B, :] = FᵀF`` (``F = L⁻¹ H⁻¹[B, :]``,
    ``H⁻¹_BB = LLᵀ``) is applied lazily as in the unstructured pass: the c×c diagonal blocks are
    kept current in O(d·c²) per step, the pivot columns are rebuilt from the pending factors, and
    the pending factors are flushed by one GEMM once about ``lazy_rank`` rows have accumulated.

    Returns the block order (R, d // c) and the block losses (R, d // c).
    """
    R, d = w.shape
    nb = d // c
    dev, dt = w.device, w.dtype
    w = w.clone()
    base = Hinv.expand(R, d, d).clone()
    Dblk = Hinv.reshape(nb, c, nb, c).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    Dblk = Dblk.expand(R, nb, c, c).clone()  # current c×c diagonal blocks
    per_flush = max(1, lazy_rank // c)
    Fp = torch.zeros((R, per_flush * c, d), dtype=dt, device=dev)
    done = torch.zeros((R, nb), dtype=torch.bool, device=dev)
    eye = torch.eye(c, dtype=dt, device=dev)
    ar = torch.arange(R, device=dev)
    offs = torch.arange(c, device=dev)
    order = torch.empty((R, nb), dtype=torch.int64, device=dev)
    losses = torch.empty((R, nb), dtype=dt, device=dev)
    j = 0  # pending factor rows
    for t in range(nb):
        Hb = torch.where(done[:, :, None, None], eye, Dblk)
        L, _ = torch.linalg.cholesky_ex(Hb)
        wb = w.reshape(R, nb, c, 1)
        z = torch.cholesky_solve(wb, L)
        score = (0.5 * (wb * z).sum(dim=(2, 3))).masked_fill(done, float("inf"))
        b = score.argmin(dim=1)
        order[:, t] = b
        losses[:, t] = score.gather(1, b[:, None]).squeeze(1)
        idx = b[:, None] * c + offs[None, :]
        Hcol = base.gather(2, idx[:, None, :].expand(R, d, c))  # current H⁻¹[:, B]
        if j:
            Fb = Fp[:, :j].gather(2, idx[:, None, :].expand(R, j, c))
            Hcol = Hcol - torch.bmm(Fp[:, :j].transpose(1, 2), Fb)
        w = w - torch.bmm(Hcol, z[ar, b]).squeeze(-1)
        w.scatter_(1, idx, 0.0)
        F = torch.linalg.solve_triangular(L[ar, b], Hcol.transpose(1, 2), upper=False)  # (R, c, d)
        Fr = F.reshape(R, c, nb, c)
        Dblk = Dblk - torch.einsum("rsbi,rsbj->rbij", Fr, Fr)
        Fp[:, j : j + c] = F
        j += c
        done[ar, b] = True
        if j == Fp.shape[1]:
            base.baddbmm_(Fp.transpose(1, 2), Fp, alpha=-1.0)
            Fp.zero_()
            j = 0
    return order, losses


# ----------------------------------------------------------------------------------------------
# allocation of per-row counts (§1.3)


def _hull_segments(unit_losses: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segments of every row's lower convex hull of its cumulative loss curve.

    The slopes of the greatest convex minorant of a cumulative sum are the isotonic (nondecreasing)
    regression of its increments; runs of equal fitted slope are the hull segments.

    Returns:
        (row, length, slope) of every segment, rows in order and segments in order within a row.
    """
    from sklearn.isotonic import isotonic_regression

    rows, n = unit_losses.shape
    fitted = np.empty_like(unit_losses)
    for r in range(rows):
        fitted[r] = isotonic_regression(unit_losses[r], increasing=True)
    new_seg = np.ones((rows, n), dtype=bool)
    new_seg[:, 1:] = fitted[:, 1:] != fitted[:, :-1]
    starts = np.flatnonzero(new_seg.reshape(-1))
    ends = np.append(starts[1:], rows * n)
    seg_row = starts // n
    seg_len = ends - starts
    seg_slope = fitted.reshape(-1)[starts]
    return seg_row, seg_len, seg_slope


def _exchange_polish(C: np.ndarray, k: np.ndarray, max_moves: int, max_shift: int) -> np.ndarray:
    """Move q ≤ ``max_shift`` units from one row to another while that lowers ``Σ_r C[r, k_r]``.

    Every move is the best single exchange (over q and over ordered row pairs a ≠ b); the total
    ``Σ k_r`` is unchanged.
    """
    rows, n1 = C.shape
    n = n1 - 1
    Q = max(1, min(max_shift, n))
    ar = np.arange(rows)[:, None]
    q = np.arange(1, Q + 1)[None, :]
    k = k.copy()
    for _ in range(max_moves):
        base = C[ar[:, 0], k][:, None]
        lo = k[:, None] - q
        hi = k[:, None] + q
        gain = np.where(lo >= 0, base - C[ar, np.clip(lo, 0, n)], -np.inf)  # (rows, Q)
        cost = np.where(hi <= n, C[ar, np.clip(hi, 0, n)] - base, np.inf)
        # best donor a and best receiver b != a for every q
        a1 = np.argmax(gain, axis=0)
        g1 = gain[a1, np.arange(Q)]
        gain2 = gain.copy()
        gain2[a1, np.arange(Q)] = -np.inf
        g2 = gain2.max(axis=0)
        b1 = np.argmin(cost, axis=0)
        c1 = cost[b1, np.arange(Q)]
        cost2 = cost.copy()
        cost2[b1, np.arange(Q)] = np.inf
        c2 = cost2.min(axis=0)
        same = a1 == b1
        delta = np.where(same, np.maximum(g1 - c2, g2 - c1), g1 - c1)
        qi = int(np.argmax(delta))
        if not delta[qi] > 1e-12 * max(1.0, float(base.sum())):
            break
        a, b = int(a1[qi]), int(b1[qi])
        if same[qi]:
            if g1[qi] - c2[qi] >= g2[qi] - c1[qi]:
                b = int(np.argmin(cost2[:, qi]))
            else:
                a = int(np.argmax(gain2[:, qi]))
        k[a] -= qi + 1
        k[b] += qi + 1
    return k


def allocate_counts(
    unit_losses: torch.Tensor | np.ndarray,
    totals: Sequence[int],
    polish: bool = True,
    max_shift: int = 64,
) -> np.ndarray:
    """Per-row removal counts minimising the layer error for each requested total.

    ``C_r(k) = Σ_{t<k} unit_losses[r, t]`` is the exact error of row r after its first k greedy
    steps; the layer error of counts ``k_r`` is ``Σ_r C_r(k_r)``. Whole segments of the rows' lower
    convex hulls are taken in order of increasing slope (exact at hull breakpoints), the last one
    partly, then single units are exchanged between rows while that lowers the layer error.

    Args:
        unit_losses: (rows, n) per-step losses of every row, in elimination order.
        totals: total removals for the whole layer, each in [0, rows·n].
        polish: run the exchange polish.
        max_shift: the most units one exchange moves between two rows.

    Returns:
        (len(totals), rows) int64 counts, each row summing to its total.
    """
    if torch.is_tensor(unit_losses):
        unit_losses = unit_losses.detach().cpu().double().numpy()
    ul = np.asarray(unit_losses, dtype=np.float64)
    rows, n = ul.shape
    out = np.zeros((len(totals), rows), dtype=np.int64)
    if rows == 0 or n == 0:
        return out
    ul = np.maximum(ul, 0.0)
    C = np.concatenate([np.zeros((rows, 1)), np.cumsum(ul, axis=1)], axis=1)
    seg_row, seg_len, seg_slope = _hull_segments(ul)
    pos = np.arange(seg_row.size)
    take = np.lexsort((pos, seg_slope))
    seg_row, seg_len = seg_row[take], seg_len[take]
    cum = np.cumsum(seg_len)
    for li, K in enumerate(totals):
        K = int(K)
        if not 0 <= K <= rows * n:
            raise ValueError(f"total removals must be in [0, {rows * n}], found {K}")
        f = int(np.searchsorted(cum, K, side="right"))
        k = np.bincount(seg_row[:f], weights=seg_len[:f], minlength=rows).astype(np.int64)
        rem = K - (int(cum[f - 1]) if f else 0)
        if rem:
            k[seg_row[f]] += rem
        if polish:
            k = _exchange_polish(C, k, max_moves=4 * rows + 16, max_shift=max_shift)
        out[li] = k
    return out


# ----------------------------------------------------------------------------------------------
# public entry point


def _as_levels(sparsity: float | Sequence[float]) -> tuple[list[float], bool]:
    if isinstance(sparsity, (list, tuple)):
        if not sparsity:
            raise InvalidInputError("sparsity list must not be empty; pass e.g. [0.5, 0.7, 0.9]")
        levels = list(sparsity)
        single = False
    else:
        levels = [sparsity]
        single = True
    for s in levels:
        check_sparsity(s)
    return [float(s) for s in levels], single


def exact_obs_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float | Sequence[float] = 0.5,
    *,
    n_m: tuple[int, int] | None = None,
    block: int | None = None,
    allocation: str = "global",
    kernel_area: int = 1,
    damp: float = DEFAULT_DAMP,
    row_batch: int | None = None,
    dtype: torch.dtype | None = None,
    lazy_rank: int = DEFAULT_LAZY_RANK,
    active_set: bool | None = None,
) -> SolveResult | list[SolveResult]:
    """Prune a layer with ExactOBS (greedy OBS per row, exact inverse downdates).

    Args:
        W: (rows, cols) weights; conv weights flattened as ``weight.flatten(1)``.
        H: (cols, cols) Hessian ``2·XᵀX/n``.
        sparsity: layer sparsity in [0, 1), or a list of them: all levels come from ONE greedy pass
            and a list of results is returned. Ignored when ``n_m`` is given.
        n_m: keep N of every M consecutive weights (input channels at one tap), e.g. (2, 4).
        block: prune blocks of this many consecutive input channels (at one tap) at a time.
        allocation: ``"global"``: per-row counts chosen for the layer sparsity from the rows' exact
            loss curves; ``"uniform"``: every row gets exactly ``round(s·cols)`` zeros (in blocks:
            ``round(s·cols/block)`` blocks).
        kernel_area: kh·kw for conv layers whose columns are ordered (C_in, kh, kw); 1 otherwise.
        damp: relative damping of H for the solve (errors use the undamped H).
        row_batch: rows per batch (default: sized from memory).
        dtype: working precision (default float64 on CPU, float32 on CUDA).
        lazy_rank: pending rank-1 downdates before one batched GEMM flush (1 = eager).
        active_set: compact the removed coordinates away during the pass (default: on CUDA only;
            on the CPU the copies cost about what they save, see bench/pruning_solvers.py).

    Returns:
        One :class:`SolveResult` (or a list, one per requested level) with ``weight`` in W's dtype
        and device, ``row_error`` (exact, undamped H), ``mask`` (True = kept) and ``info`` holding
        ``order`` (rows, cols) int64 (original column indices, elimination order) and
        ``step_losses`` (rows, cols) float64 (loss of each greedy step under the damped H; their
        cumulative sums are the rows' error curves) for the unstructured pass, ``block_order`` and
        ``block_losses`` (rows, cols/block) for blocks, and for N:M ``order``/``step_losses`` of
        the removed coordinates only (rows, cols·(M−N)/M); all on the CPU. ``row_zeros`` holds the
        per-row zero counts of the level.

    Raises:
        InvalidInputError: bad W, H, allocation, block or kernel_area (named subclasses:
            NonFiniteError, ShapeMismatchError, SparsityOutOfRangeError, NMPatternError).
        HessianNotPSDError: if the damped H cannot be factorised.
    """
    check_weight(W)
    rows, cols = W.shape
    check_hessian(H, cols)
    if allocation not in ALLOCATIONS:
        raise InvalidInputError(f"allocation must be one of {ALLOCATIONS}, found {allocation!r}")
    if not isinstance(lazy_rank, int) or lazy_rank < 1:
        raise InvalidInputError(f"lazy_rank must be an int >= 1, found {lazy_rank!r}")
    if n_m is not None and block is not None:
        raise InvalidInputError("pass either n_m or block, not both")
    perm = channel_major_perm(cols, kernel_area)
    if n_m is not None:
        n_m = check_n_m(n_m, cols)
        c_in = cols // kernel_area
        if c_in % n_m[1]:
            raise NMPatternError(
                f"N:M {n_m[0]}:{n_m[1]} runs along input channels, so C_in = {c_in} (cols {cols} /"
                f" kernel_area {kernel_area}) must be a multiple of {n_m[1]}; use unstructured "
                "sparsity for this layer"
            )
        levels, single = [0.0], True
    else:
        levels, single = _as_levels(sparsity)
    if block is not None:
        c_in = cols // kernel_area
        if not isinstance(block, int) or block < 1 or c_in % block:
            raise ShapeMismatchError(
                f"block must be an int >= 1 dividing C_in = {c_in} (cols {cols} / kernel_area "
                f"{kernel_area}), found {block!r}; use block=1 or unstructured sparsity"
            )
    structured = n_m is not None or block is not None
    if not structured:
        perm = torch.arange(cols)

    dev = W.device
    wd = solve_dtype(dev, dtype)
    perm_d = perm.to(dev)
    Hp = H.to(dev)[perm_d][:, perm_d]
    prep = prepare_hessian(Hp, damp)
    Hinv = inverse_hessian(prep).to(wd)
    Wk = W[:, perm_d].to(wd).masked_fill(prep.dead[None, :], 0.0)
    R = row_batch or auto_row_batch(rows, cols, wd, dev, copies=3)
    compact = dev.type == "cuda" if active_set is None else bool(active_set)

    def finish(W_hat_p: torch.Tensor, keep_p: torch.Tensor, info: dict) -> SolveResult:
        W_hat = torch.empty_like(W_hat_p)
        W_hat[:, perm_d] = W_hat_p
        keep = torch.empty_like(keep_p)
        keep[:, perm_d] = keep_p
        W_hat = W_hat.to(W.dtype)
        return SolveResult(W_hat, row_errors(W, W_hat, H.to(dev)), mask=keep, info=info)

    if n_m is not None:
        n, m = n_m
        steps = (cols // m) * (m - n)
        orders, losses, outs = [], [], []
        for s in range(0, rows, R):
            o, l_, w = _greedy_batch(Wk[s : s + R], Hinv, steps, lazy_rank, n_m, compact)
            orders.append(o)
            losses.append(l_)
            outs.append(w)
        order = torch.cat(orders)
        W_hat_p = torch.cat(outs)
        keep_p = torch.ones((rows, cols), dtype=torch.bool, device=dev).scatter(1, order, False)
        info = {
            "method": "exact_obs",
            "pattern": f"{n}:{m}",
            "order": perm[order.cpu()],
            "step_losses": torch.cat(losses).cpu().double(),
        }
        return finish(W_hat_p.masked_fill(~keep_p, 0.0), keep_p, info)

    c = block or 1
    n_units = cols // c
    if block is None:
        orders, losses = [], []
        for s in range(0, rows, R):
            o, l_, _ = _greedy_batch(Wk[s : s + R], Hinv, cols, lazy_rank, None, compact)
            orders.append(o)
            losses.append(l_)
        order_el = torch.cat(orders)
        unit_losses = torch.cat(losses).cpu().double()
        info_base = {"method": "exact_obs", "order": order_el.cpu(), "step_losses": unit_losses}
    else:
        orders, losses = [], []
        for s in range(0, rows, R):
            o, l_ = _block_batch(Wk[s : s + R], Hinv, c, lazy_rank)
            orders.append(o)
            losses.append(l_)
        block_order = torch.cat(orders)
        unit_losses = torch.cat(losses).cpu().double()
        order_el = (block_order[:, :, None] * c + torch.arange(c, device=dev)).reshape(rows, cols)
        info_base = {
            "method": "exact_obs",
            "block": c,
            "order": perm[order_el.cpu()],
            "block_order": block_order.cpu(),
            "block_losses": unit_losses,
        }

    if allocation == "uniform":
        counts = np.array([[int(round(s * n_units))] * rows for s in levels], dtype=np.int64)
    else:
        totals = [int(round(s * rows * n_units)) for s in levels]
        counts = allocate_counts(unit_losses, totals)
    counts_t = torch.from_numpy(counts).reshape(len(levels), rows) * c
    W_levels = replay_order(Wk, Hinv, order_el, counts_t, row_batch=R)
    pos = torch.empty_like(order_el).scatter_(
        1, order_el, torch.arange(cols, device=dev).expand(rows, cols).contiguous()
    )
    results = []
    for li, s in enumerate(levels):
        keep_p = pos >= counts_t[li].to(dev)[:, None]
        info = dict(info_base, sparsity=s, allocation=allocation, row_zeros=counts_t[li].clone())
        results.append(finish(W_levels[li], keep_p, info))
    return results[0] if single else results
