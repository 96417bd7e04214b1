"""The greedy OBS elimination that OBQ and ExactOBS share, with lazy inverse downdates.

See docs/solvers.md §2. A batch of R rows each holds its own inverse ``H⁻¹`` over the coordinates
it has not fixed yet. Fixing coordinate p of a row to a target t is one OBS step (§1):

* loss ``(w_p − t)² / (2 [H⁻¹]_pp)``;
* correction ``w −= ((w_p − t) / [H⁻¹]_pp) · H⁻¹[p, :]`` (w_p lands exactly on t);
* downdate ``H⁻¹ −= u uᵀ`` with ``u = H⁻¹[p, :] / √[H⁻¹]_pp``.

The greedy choice of the next coordinate needs only the diagonal of the current inverse (kept up
to date in O(n) per step) and the pivot row, which is the stored row minus the pending factors'
contribution (O(n·k) for k pending). So the downdates are queued and applied every ``rank`` steps
by one batched GEMM (a rank-``rank`` update), and at those flushes the fixed coordinates are
dropped from the stored matrices once enough have accumulated (the *active set*): later steps
touch about (n − t)² entries instead of n². Every row fixes exactly one coordinate per step, so
the active sets of a batch stay the same size. The greedy result does not depend on ``rank`` or on
the compaction, up to rounding.

Fixed coordinates carry ``diag = −1`` so that every score of the form ``diag / err²`` is negative
there and an ``argmax`` never picks them; a caller may also set ``−1`` to close coordinates it must
never pick (N:M groups that hold their quota of zeros). Such closed coordinates are remembered in
``closed`` and keep their mark across compactions.
"""

from __future__ import annotations

import torch

# pending downdates per flush by default: with compaction every max(rank, n/8) steps, rank 64
# halves the compactions at 256 columns against 32 (OBQ and ExactOBS passes 20–23 % faster there
# on one core under the default malloc, about the same from 512 up; docs/solvers.md §9.1)
DEFAULT_LAZY_RANK = 64


class LazyInverse:
    """R stacked inverses over the free coordinates, with queued (lazy) downdates.

    Attributes:
        w: (R, n) working weights of the active slots (callers read it afresh every step: a
            compaction replaces it).
        diag: (R, n) current diagonal of every row's inverse; −1 on fixed and closed slots.
        idx: (R, n) original column of every active slot.
        fixed: (R, n) bool, slots fixed since the last compaction (kept only when compacting).
        closed: (R, n) bool, slots a caller closed (kept at −1 across compactions), or None.
        out: (R, cols) final values of the slots dropped so far, in original column order.
    """

    def __init__(
        self,
        w: torch.Tensor,
        Hinv: torch.Tensor,
        rank: int,
        compact: bool,
        idx: torch.Tensor | None = None,
        cols: int | None = None,
        steps: int | None = None,
    ) -> None:
        """Start from weights ``w`` (R, n) and the inverse ``Hinv`` ((n, n) shared or (R, n, n)).

        :param w: working weights, any float dtype; copied.
        :param Hinv: inverse of the damped H over the n starting coordinates, w's dtype; a
            stacked (R, n, n) one is taken over and overwritten (flushes, compactions).
        :param rank: pending downdates before one GEMM applies them (1 = eager).
        :param compact: drop fixed coordinates at flushes (the active set).
        :param idx: (R, n) original column of each starting slot (default 0..n−1); an index equal
            to ``cols`` marks a padding slot whose value is discarded.
        :param cols: width of ``out`` (default n).
        :param steps: the eliminations the caller will make, when known: the downdates queued
            by the last ones are then never applied (no later step reads them).
        """
        if rank < 1:
            raise ValueError(f"lazy rank must be >= 1, found {rank}")
        R, n = w.shape
        dev, dt = w.device, w.dtype
        # a shared (n, n) inverse is read as it is until the first flush writes the R copies
        self.shared = Hinv.dim() == 2
        self.base = Hinv if self.shared else Hinv.contiguous()
        self.diag = torch.diagonal(self.base, dim1=-2, dim2=-1).expand(R, n).clone()
        self.w = w.clone()
        self.idx = torch.arange(n, device=dev).expand(R, n).contiguous() if idx is None else idx
        self.identity = idx is None  # slot i is column i (until a compaction)
        self.cols = n if cols is None else cols
        self.out = torch.zeros((R, self.cols + 1), dtype=dt, device=dev)  # +1: padding sink
        self.fixed = torch.zeros((R, n), dtype=torch.bool, device=dev)
        self.closed: torch.Tensor | None = None
        self.rank = rank
        self.compact = compact
        # pending factors u_s: only the first k are ever read
        self.U = torch.empty((R, rank, n), dtype=dt, device=dev)
        self.k = 0
        self.left = steps  # eliminations still to come (None: unknown)
        self.since = 0  # eliminations since the last compaction
        self.frac = 8
        self._arn = torch.arange(R, device=dev) * n

    @property
    def n(self) -> int:
        """Active slots per row."""
        return self.w.shape[1]

    def rows(self, P: torch.Tensor) -> torch.Tensor:
        """(R, c, n) current rows ``H⁻¹[P[r, i], :]`` of every row's inverse (P: (R, c))."""
        R, n = self.w.shape
        c = P.shape[1]
        rows = self._stored_rows(P).view(R, c, n)
        if self.k:
            U = self.U[:, : self.k]
            coef = U.gather(2, P[:, None, :].expand(R, self.k, c))  # (R, k, c)
            rows.baddbmm_(coef.transpose(1, 2), U, alpha=-1.0)  # rows is a fresh copy
        return rows

    def _stored_rows(self, P: torch.Tensor) -> torch.Tensor:
        """(R·c, n) rows ``P[r, i]`` of the stored matrices, pending downdates not applied."""
        R, n = self.w.shape
        if self.shared:
            return self.base.index_select(0, P.reshape(-1))
        flat = (self._arn[:, None] + P).reshape(-1)
        return self.base.view(R * n, n).index_select(0, flat)

    def eliminate(self, p: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fix slot ``p[r]`` of every row r at ``target[r]`` (one OBS step each).

        :param p: (R,) int64 active slot per row, not yet fixed.
        :param target: (R, 1) value the slot must take.
        :returns: ``(r, piv)``, both (R, 1): the residual ``w_p − t`` and ``[H⁻¹]_pp``; the
            step's loss is ``r² / (2·piv)``.
        :raises ValueError: more eliminations than the ``steps`` given at construction.
        """
        if self.k == self.rank:  # only after the last declared step, which skipped its flush
            raise ValueError("more eliminations than the steps declared at construction")
        pc = p[:, None]
        row = self.rows(pc).squeeze(1)  # (R, n)
        piv = row.gather(1, pc)
        r = self.w.gather(1, pc).sub_(target)
        self.w.addcmul_(r / piv, row, value=-1.0)
        self.w.scatter_(1, pc, target)
        u = torch.mul(row, piv.rsqrt(), out=self.U[:, self.k])
        self.diag.addcmul_(u, u, value=-1.0)
        self.diag.scatter_(1, pc, -1.0)
        if self.compact:
            self.fixed.scatter_(1, pc, True)
        self._queued(1)
        return r, piv

    def downdate_block(self, F: torch.Tensor, P: torch.Tensor) -> None:
        """Queue the rank-c downdate ``H⁻¹ −= FᵀF`` (F: (R, c, n)) that fixes slots P (R, c).

        The caller has already moved ``w``; ``diag`` is updated here. Needs ``rank >= c``.
        """
        c = F.shape[1]
        if self.k + c > self.rank:
            self.flush()
        self.U[:, self.k : self.k + c] = F
        self.diag.sub_((F * F).sum(1))
        self.diag.scatter_(1, P, -1.0)
        self.fixed.scatter_(1, P, True)
        self._queued(c)

    def refill(self, slots: torch.Tensor, w: torch.Tensor, side: torch.Tensor,
               corner: torch.Tensor) -> None:
        """Put new coordinates in fixed slots: the inverse grows by a border, the rest stays.

        Needs stacked inverses, nothing pending (:meth:`flush`) and no compaction.

        :param slots: (R, c) fixed slots that take the new coordinates.
        :param w: (R, c) their working weights.
        :param side: (R, n, c) their columns of the inverse at every slot (zero at fixed ones).
        :param corner: (R, c, c) the inverse among themselves.
        """
        if self.k or self.shared or self.compact:
            raise ValueError("refill needs stacked inverses, no pending downdates, no compaction")
        R, n = self.w.shape
        c = slots.shape[1]
        self.base.scatter_(2, slots[:, None, :].expand(R, n, c), side)
        self.base.scatter_(1, slots[:, :, None].expand(R, c, n), side.transpose(1, 2))
        at = (slots[:, :, None] * n + slots[:, None, :]).view(R, c * c)
        self.base.view(R, n * n).scatter_(1, at, corner.reshape(R, c * c))
        self.w.scatter_(1, slots, w)
        self.diag.scatter_(1, slots, torch.diagonal(corner, dim1=1, dim2=2))

    def close(self, mask: torch.Tensor) -> None:
        """Never let an argmax pick the slots in ``mask`` (R, n) again (they stay free)."""
        self.closed = mask if self.closed is None else self.closed | mask
        self.diag.masked_fill_(mask, -1.0)

    def close_slots(self, slots: torch.Tensor, where: torch.Tensor) -> None:
        """Like :meth:`close` for the slots ``slots`` (R, c) of the rows where ``where`` (R, 1)."""
        self.diag.scatter_(1, slots, self.diag.gather(1, slots).masked_fill_(where, -1.0))
        if self.compact:  # remembered for the compactions to come
            mask = torch.zeros_like(self.fixed).scatter_(1, slots, where.expand_as(slots))
            self.closed = mask if self.closed is None else self.closed | mask

    def _queued(self, c: int) -> None:
        self.k += c
        self.since += c
        if self.left is not None:
            self.left -= c
        if self.k == self.rank and (self.left is None or self.left > 0):
            self.flush()

    def flush(self) -> None:
        """Apply the pending downdates; drop the fixed slots if enough have accumulated."""
        if self.k == 0:
            return
        U = self.U[:, : self.k]
        left = self.n - self.since
        if self.compact and left > 0 and self.since >= max(self.rank, self.n // self.frac):
            self._compact(U, left)
        elif self.shared:
            R, n = self.w.shape
            self.base = torch.baddbmm(self.base.expand(R, n, n), U.transpose(1, 2), U, alpha=-1.0)
            self.shared = False
        else:
            self.base.baddbmm_(U.transpose(1, 2), U, alpha=-1.0)
        self.k = 0

    def _compact(self, U: torch.Tensor, left: int) -> None:
        R, n = self.w.shape
        order = torch.argsort(self.fixed.to(torch.int8), dim=1, stable=True)  # free slots first
        gone, keep = order[:, left:], order[:, :left]
        self.out.scatter_(1, self.idx.gather(1, gone), self.w.gather(1, gone))
        if self.w.device.type == "cpu":
            flat = self._compact_rows(keep)
        else:  # one batched gather: a loop over rows would be one kernel launch per row
            rows = self._stored_rows(keep).view(R, left, n)
            flat = rows.gather(2, keep[:, None, :].expand(R, left, left)).view(-1)
        Uk = U.gather(2, keep[:, None, :].expand(R, self.k, left))
        self.base = flat[: R * left * left].view(R, left, left).baddbmm_(
            Uk.transpose(1, 2), Uk, alpha=-1.0)
        self.shared = False
        self.w = self.w.gather(1, keep)
        self.idx = self.idx.gather(1, keep)
        self.identity = False
        self.diag = torch.diagonal(self.base, dim1=1, dim2=2).clone()
        if self.closed is not None:
            self.closed = self.closed.gather(1, keep)
            self.diag.masked_fill_(self.closed, -1.0)
        self.fixed = torch.zeros((R, left), dtype=torch.bool, device=self.w.device)
        self.U = self.U.view(-1)[: R * self.rank * left].view(R, self.rank, left)
        self._arn = torch.arange(R, device=self.w.device) * left
        self.since = 0

    def _compact_rows(self, keep: torch.Tensor) -> torch.Tensor:
        """The kept R × left × left blocks, flat, built one row at a time on the CPU.

        Row r's block is written at r·left² onwards, before row r+1's old block at (r+1)·n² ≥
        (r+1)·left², so once the R copies exist they are compacted in place: cache-sized pieces
        and no fresh R × left × left buffer (whose page faults cost more than the copy).
        """
        R, left = keep.shape
        n = self.n
        flat = torch.empty(R * left * left, dtype=self.w.dtype) if self.shared \
            else self.base.view(-1)
        tmp = torch.empty((left, n), dtype=self.w.dtype)
        for r in range(R):
            torch.index_select(self.base if self.shared else self.base[r], 0, keep[r], out=tmp)
            torch.index_select(tmp, 1, keep[r], out=flat[r * left * left : (r + 1) * left * left]
                               .view(left, left))
        return flat

    def original(self, p: torch.Tensor) -> torch.Tensor:
        """(R,) original columns of the active slots ``p`` (R,)."""
        return p if self.identity else self.idx.gather(1, p[:, None]).squeeze(1)

    def track(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (R, cols), a per-column tensor, read at the current active slots."""
        return t.gather(1, self.idx.clamp(max=t.shape[1] - 1))

    def result(self) -> torch.Tensor:
        """(R, cols) final weights of every slot in original column order."""
        out = self.out.scatter(1, self.idx, self.w)
        return out[:, : self.cols]
