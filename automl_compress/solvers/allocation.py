"""Per-row removal counts for a layer sparsity, from the rows' greedy loss curves.

docs/solvers.md §4. ``C_r(k)``, the cumulative step loss of row r after its first k greedy
eliminations, is the exact error of that row at k zeros; a layer sparsity asks for counts ``k_r``
with a fixed total that minimise ``Σ_r C_r(k_r)``. Step losses are not monotone, so sorting them
(the released OBC code) is only approximate. Here whole segments of every row's lower convex hull
are taken in order of increasing slope (exact at hull breakpoints), the last one partly, and then
units are exchanged between rows while that lowers the layer error.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _hull_segments(unit_losses: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segments of every row's lower convex hull of its cumulative loss curve.

    The slopes of the greatest convex minorant of a cumulative sum are the isotonic (nondecreasing)
    regression of its increments; runs of equal fitted slope are the hull segments.

    Returns:
        (row, length, slope) of every segment, rows in order and segments in order within a row.
    """
    from sklearn.isotonic import isotonic_regression

    rows, n = unit_losses.shape
    # One isotonic regression for all rows: row r is lifted by 2r (after scaling the losses into
    # [0, 1]), so no run of the pool-adjacent-violators pass can cross a row boundary.
    top = max(float(unit_losses.max()), 1e-300)
    lift = 2.0 * np.arange(rows)[:, None]
    fitted = isotonic_regression((unit_losses / top + lift).reshape(-1), increasing=True)
    fitted = fitted.reshape(rows, n)
    new_seg = np.ones((rows, n), dtype=bool)
    new_seg[:, 1:] = fitted[:, 1:] != fitted[:, :-1]
    starts = np.flatnonzero(new_seg.reshape(-1))
    ends = np.append(starts[1:], rows * n)
    seg_row = starts // n
    seg_len = ends - starts
    seg_slope = (fitted - lift).reshape(-1)[starts] * top
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
