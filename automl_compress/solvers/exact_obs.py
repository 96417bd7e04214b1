"""ExactOBS pruning: greedy optimal brain surgeon, one weight (or block) at a time, per row.

Frantar, Singh, Alistarh, "Optimal Brain Compression", NeurIPS 2022 (arXiv 2208.11580); the maths
is in docs/solvers.md §1–4. Every row is an independent quadratic problem with the shared H. The
greedy step removes the free coordinate ``p = argmin w_p² / [H⁻¹]_pp`` of each row by one OBS step
(:class:`~automl_compress.solvers.lazy_inverse.LazyInverse`: lazy downdates, active set).

* Unstructured: one pass records each row's elimination order and step losses (not weight traces);
  the weights at any level are the exact least-squares optimum on the kept support (snapshots of
  the pass for uniform counts, else
  ``lstsq.masked_solve``). Per-row counts come from the
  rows' exact loss curves (:mod:`~automl_compress.solvers.allocation`) or are uniform.
* N:M: the same loop; a group that holds its quota of zeros is closed.
* Blocks of c input channels: group OBS on the c×c diagonal blocks of H⁻¹ (rank-c downdates).

For conv layers (columns ordered (C_in, kh, kw)) ``kernel_area = kh·kw`` makes N:M groups and
blocks run along input channels at one kernel tap.

Example (one row, keep one of two weights)::

    >>> import torch
    >>> W = torch.tensor([[1.0, 0.2]], dtype=torch.float64)
    >>> H = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    >>> res = exact_obs_prune(W, H, sparsity=0.5, damp=0.0)
    >>> [round(v, 6) for v in res.weight[0].tolist()]  # 1.0 absorbs 0.2·H₀₁/H₀₀
    [1.1, 0.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from automl_compress.errors import InvalidInputError, NMPatternError, ShapeMismatchError
from automl_compress.solvers.allocation import allocate_counts
from automl_compress.solvers.checks import check_hessian, check_n_m, check_sparsity, check_weight
from automl_compress.solvers.hessian import (
    DEFAULT_DAMP,
    inverse_hessian,
    prepare_hessian,
    row_errors,
)
from automl_compress.solvers.lazy_inverse import DEFAULT_LAZY_RANK, LazyInverse
from automl_compress.solvers.lstsq import masked_solve
from automl_compress.solvers.numerics import auto_row_batch, row_argmax, solve_dtype
from automl_compress.solvers.result import SolveResult

ALLOCATIONS = ("global", "uniform")


def nm_lazy_rank(n: int) -> int:
    """Pending downdates per flush of an N:M pass without compaction over n columns.

    A flush reads and writes every row's n × n inverse, and every step reads the pending
    factors (r/2 rows of n entries on average at rank r), so a larger rank trades flushes for
    longer reads. Measured with ``bench/nm_rank.py`` (docs/solvers.md §9.1) the best rank grows
    with n: 32 at 256 columns, 64 at 512, 128 at 1024 (64 and 128 level at 1536); so about n/8,
    in multiples of 16 from 16 to 128.
    """
    return min(128, max(16, 16 * round(n / 128)))


def channel_major_perm(cols: int, kernel_area: int) -> torch.Tensor:
    """Permutation taking (C_in, kh, kw) column order to (kh, kw, C_in) order.

    ``W[:, perm]`` has every run of consecutive columns at one kernel tap over input channels.

    :raises ShapeMismatchError: if ``cols`` is not a multiple of ``kernel_area``.
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


def greedy_prune(
    inv: LazyInverse,
    steps: int,
    n_m: tuple[int, int] | None = None,
    snapshots: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """Eliminate ``steps`` coordinates of every row of ``inv`` by greedy OBS (in place).

    :param inv: the rows' working weights and inverses.
    :param steps: eliminations per row.
    :param n_m: close a group of M consecutive columns once it holds M − N zeros.
    :param snapshots: numbers of eliminations after which to copy the weights (each the exact
        least-squares optimum on the row's remaining support).
    :returns: the order (R, steps) in original columns, the step losses (R, steps) under the
        damped H, and the snapshots {count: (R, cols) weights}.
    """
    R = inv.w.shape[0]
    dev = inv.w.device
    order = torch.empty((R, steps), dtype=torch.int64, device=dev)
    losses = torch.empty((R, steps), dtype=inv.w.dtype, device=dev)
    zero = torch.zeros((R, 1), dtype=inv.w.dtype, device=dev)
    if n_m is not None:
        n, m = n_m
        zeros_in_group = torch.zeros((R, inv.cols // m), dtype=torch.int64, device=dev)
        one = torch.ones((R, 1), dtype=torch.int64, device=dev)
        members = torch.arange(m, device=dev)[None, :]
        idx_seen = slot_group = None
    wanted, snaps = set(snapshots), {}
    for t in range(steps + 1):
        if t in wanted:
            snaps[t] = inv.result()
        if t == steps:
            break
        w = inv.w
        # argmin over free j of w_j²/[H⁻¹]_jj; fixed and closed slots carry diag = −1
        p = row_argmax(torch.div(inv.diag, w * w))
        j = inv.original(p)
        order[:, t] = j
        r, piv = inv.eliminate(p, zero)
        torch.div(r * r, piv, out=losses[:, t : t + 1])
        if n_m is not None:
            g = torch.div(j, m, rounding_mode="floor")[:, None]
            zeros_in_group.scatter_add_(1, g, one)
            full = zeros_in_group.gather(1, g) >= m - n
            if inv.identity:  # slot = column: the group's slots are g·M … g·M + M − 1
                inv.close_slots(g * m + members, full)
            else:
                if inv.idx is not idx_seen:  # a compaction moved the slots
                    idx_seen, slot_group = inv.idx, torch.div(inv.idx, m, rounding_mode="floor")
                inv.close(full & (slot_group == g))
    return order, losses.mul_(0.5), snaps


def _block_pass(
    w: torch.Tensor, Hinv: torch.Tensor, c: int, lazy_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-OBS elimination of all blocks of c consecutive columns of every row of ``w`` (R, d).

    The rank-c downdate ``H⁻¹ −= H⁻¹[:, B] (H⁻¹_BB)⁻¹ H⁻¹[B, :] = FᵀF`` (``F = L⁻¹ H⁻¹[B, :]``,
    ``H⁻¹_BB = LLᵀ``) is queued like the rank-1 ones; the c×c diagonal blocks are kept current in
    O(d·c²) per step.

    :returns: the block order (R, d // c) and the block losses (R, d // c).
    """
    R, d = w.shape
    nb = d // c
    dev, dt = w.device, w.dtype
    inv = LazyInverse(w, Hinv, max(c, lazy_rank // c * c), compact=False)
    Dblk = Hinv.reshape(nb, c, nb, c).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    Dblk = Dblk.expand(R, nb, c, c).clone()  # current c×c diagonal blocks
    done = torch.zeros((R, nb), dtype=torch.bool, device=dev)
    eye = torch.eye(c, dtype=dt, device=dev)
    ar = torch.arange(R, device=dev)
    offs = torch.arange(c, device=dev)
    order = torch.empty((R, nb), dtype=torch.int64, device=dev)
    losses = torch.empty((R, nb), dtype=dt, device=dev)
    for t in range(nb):
        L, _ = torch.linalg.cholesky_ex(torch.where(done[:, :, None, None], eye, Dblk))
        wb = inv.w.reshape(R, nb, c, 1)
        z = torch.cholesky_solve(wb, L)  # (H⁻¹_BB)⁻¹ w_B for every block
        score = (0.5 * (wb * z).sum(dim=(2, 3))).masked_fill(done, float("inf"))
        b = score.argmin(dim=1)
        order[:, t] = b
        losses[:, t] = score.gather(1, b[:, None]).squeeze(1)
        P = b[:, None] * c + offs[None, :]  # (R, c)
        rows = inv.rows(P)  # current H⁻¹[B, :]
        inv.w.sub_(torch.bmm(z[ar, b].transpose(1, 2), rows).squeeze(1))
        inv.w.scatter_(1, P, 0.0)
        F = torch.linalg.solve_triangular(L[ar, b], rows, upper=False)  # (R, c, d)
        Fr = F.reshape(R, c, nb, c)
        Dblk = Dblk - torch.einsum("rsbi,rsbj->rbij", Fr, Fr)
        inv.downdate_block(F, P)
        done[ar, b] = True
    return order, losses


def _as_levels(sparsity: float | Sequence[float]) -> tuple[list[float], bool]:
    if isinstance(sparsity, (list, tuple)):
        if not sparsity:
            raise InvalidInputError("sparsity list must not be empty; pass e.g. [0.5, 0.7, 0.9]")
        levels, single = list(sparsity), False
    else:
        levels, single = [sparsity], True
    for s in levels:
        check_sparsity(s)
    return [float(s) for s in levels], single


def _check_structure(
    cols: int, kernel_area: int, n_m: tuple[int, int] | None, block: int | None
) -> tuple[int, int] | None:
    if n_m is not None and block is not None:
        raise InvalidInputError("pass either n_m or block, not both")
    c_in = cols // kernel_area
    if n_m is not None:
        n_m = check_n_m(n_m, cols)
        if c_in % n_m[1]:
            raise NMPatternError(
                f"N:M {n_m[0]}:{n_m[1]} runs along input channels, so C_in = {c_in} (cols {cols} /"
                f" kernel_area {kernel_area}) must be a multiple of {n_m[1]}; use unstructured "
                "sparsity for this layer"
            )
    if block is not None and (not isinstance(block, int) or block < 1 or c_in % block):
        raise ShapeMismatchError(
            f"block must be an int >= 1 dividing C_in = {c_in} (cols {cols} / kernel_area "
            f"{kernel_area}), found {block!r}; use block=1 or unstructured sparsity"
        )
    return n_m


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
    lazy_rank: int | None = None,
    active_set: bool | None = None,
) -> SolveResult | list[SolveResult]:
    """Prune a layer with ExactOBS (greedy OBS per row, exact inverse downdates).

    :param W: (rows, cols) weights; conv weights flattened as ``weight.flatten(1)``.
    :param H: (cols, cols) Hessian ``2·XᵀX/n``.
    :param sparsity: layer sparsity in [0, 1), or a list of them: all levels come from ONE greedy
        pass and a list of results is returned. Ignored when ``n_m`` is given.
    :param n_m: keep N of every M consecutive weights (input channels at one tap), e.g. (2, 4).
    :param block: prune blocks of this many consecutive input channels (at one tap) at a time.
    :param allocation: ``"global"``: per-row counts chosen for the layer sparsity from the rows'
        exact loss curves; ``"uniform"``: every row gets exactly ``round(s·cols)`` zeros (in
        blocks: ``round(s·cols/block)`` blocks), and the pass stops at the largest count.
    :param kernel_area: kh·kw for conv layers whose columns are ordered (C_in, kh, kw); else 1.
    :param damp: relative damping of H for the solve (errors use the undamped H).
    :param row_batch: rows per batch (default: ``numerics.auto_row_batch``).
    :param dtype: working precision (default: ``numerics.solve_dtype``).
    :param lazy_rank: pending rank-1 downdates before one batched GEMM flush (1 = eager; default
        :data:`DEFAULT_LAZY_RANK`, or for N:M without compaction :func:`nm_lazy_rank`); the
        result does not depend on it.
    :param active_set: drop the removed coordinates at flushes (same result; default: on, except
        N:M on the CPU, where the shorter pass does not repay the copies).
    :returns: One :class:`SolveResult` (or a list, one per requested level) with ``weight`` in W's
        dtype and device, ``row_error`` (exact, undamped H), ``mask`` (True = kept) and ``info``:
        ``order`` (rows, cols) int64 original columns in elimination order (completed by the
        never-removed columns) and ``step_losses`` (rows, steps) float64, the loss of each greedy
        step under the damped H, for the unstructured pass (steps = cols, or the largest uniform
        count); ``block_order`` and ``block_losses`` (rows, cols/block) for blocks; for N:M
        ``order``/``step_losses`` of the removed coordinates (rows, cols·(M−N)/M); all on the
        CPU. ``row_zeros`` holds the per-row zero counts of the level.
    :raises InvalidInputError: bad W, H, allocation, block or kernel_area (named subclasses:
        NonFiniteError, ShapeMismatchError, SparsityOutOfRangeError, NMPatternError).
    :raises HessianNotPSDError: if the damped H cannot be factorised.
    """
    check_weight(W)
    rows, cols = W.shape
    check_hessian(H, cols)
    if allocation not in ALLOCATIONS:
        raise InvalidInputError(f"allocation must be one of {ALLOCATIONS}, found {allocation!r}")
    if lazy_rank is not None and (not isinstance(lazy_rank, int) or lazy_rank < 1):
        raise InvalidInputError(f"lazy_rank must be an int >= 1, found {lazy_rank!r}")
    perm = channel_major_perm(cols, kernel_area)
    n_m = _check_structure(cols, kernel_area, n_m, block)
    levels, single = ([0.0], True) if n_m is not None else _as_levels(sparsity)
    if n_m is None and block is None:
        perm = torch.arange(cols)

    dev = W.device
    wd = solve_dtype(W, dtype)
    perm_d = perm.to(dev)
    prep = prepare_hessian(H.to(dev)[perm_d][:, perm_d], damp)
    Hinv = inverse_hessian(prep).to(wd)
    Wk = W[:, perm_d].to(wd).masked_fill(prep.dead[None, :], 0.0)
    R = row_batch or auto_row_batch(rows, cols, wd, dev)

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
        # N:M stops at (M−N)/M of the columns: compaction does not pay for itself on the CPU
        compact = active_set if active_set is not None else dev.type == "cuda"
        rank = lazy_rank or (DEFAULT_LAZY_RANK if compact else nm_lazy_rank(cols))
        orders, losses, outs = [], [], []
        for s in range(0, rows, R):
            Wb = Wk[s : s + R]
            inv = LazyInverse(Wb, Hinv, rank, compact, steps=steps)
            o, l_, _ = greedy_prune(inv, steps, n_m)
            orders.append(o)
            losses.append(l_)
            outs.append(inv.result())
        order = torch.cat(orders)
        keep_p = torch.ones((rows, cols), dtype=torch.bool, device=dev).scatter(1, order, False)
        info = {
            "method": "exact_obs",
            "pattern": f"{n}:{m}",
            "order": perm[order.cpu()],
            "step_losses": torch.cat(losses).cpu().double(),
        }
        return finish(torch.cat(outs).masked_fill(~keep_p, 0.0), keep_p, info)

    c = block or 1
    n_units = cols // c
    uniform = allocation == "uniform"
    if uniform:
        counts = np.array([[int(round(s * n_units))] * rows for s in levels], dtype=np.int64)
    orders, losses, snaps = [], [], []
    for s in range(0, rows, R):
        if block is None:
            # uniform counts: snapshot the pass at each count; global: the whole curve, replayed
            steps = int(counts.max()) if uniform else cols
            inv = LazyInverse(Wk[s : s + R], Hinv, lazy_rank or DEFAULT_LAZY_RANK,
                              active_set is not False, steps=steps)
            at = sorted({int(k) for k in counts[:, 0]}) if uniform else []
            o, l_, snap = greedy_prune(inv, steps, snapshots=at)
            removed = torch.zeros_like(Wk[s : s + R], dtype=torch.bool).scatter_(1, o, True)
            rest = torch.argsort(removed.to(torch.int8), dim=1, stable=True)[:, : cols - steps]
            orders.append(torch.cat([o, rest], dim=1))
            snaps.append(snap)
        else:
            o, l_ = _block_pass(Wk[s : s + R], Hinv, c, lazy_rank or DEFAULT_LAZY_RANK)
            orders.append(o)
        losses.append(l_)
    unit_losses = torch.cat(losses).cpu().double()
    if block is None:
        order_el = torch.cat(orders)
        info_base = {"method": "exact_obs", "order": order_el.cpu(), "step_losses": unit_losses}
    else:
        block_order = torch.cat(orders)
        order_el = (block_order[:, :, None] * c + torch.arange(c, device=dev)).reshape(rows, cols)
        info_base = {
            "method": "exact_obs",
            "block": c,
            "order": perm[order_el.cpu()],
            "block_order": block_order.cpu(),
            "block_losses": unit_losses,
        }

    if not uniform:
        counts = allocate_counts(unit_losses, [int(round(s * rows * n_units)) for s in levels])
    counts_t = torch.from_numpy(counts).reshape(len(levels), rows) * c
    pos = torch.empty_like(order_el).scatter_(
        1, order_el, torch.arange(cols, device=dev).expand(rows, cols).contiguous()
    )
    results = []
    for li, s in enumerate(levels):
        keep_p = pos >= counts_t[li].to(dev)[:, None]
        if block is None and uniform:
            W_p = torch.cat([sn[int(counts_t[li, 0])] for sn in snaps])
        else:  # the exact least-squares optimum on each row's final support
            W_p = masked_solve(Wk, prep.H.to(wd), keep_p, row_batch=R, Hinv=Hinv)
        info = dict(info_base, sparsity=s, allocation=allocation, row_zeros=counts_t[li].clone())
        results.append(finish(W_p.masked_fill(~keep_p, 0.0), keep_p, info))
    return results[0] if single else results
