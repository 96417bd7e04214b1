"""Allocation within one layer: per-row bit-widths under a bit budget, and the error-vs-bits curve.

Everything here reads one :class:`~automl_compress.database.tables.LayerTable`; nothing is solved.
Bits are counted by :mod:`automl_compress.database.costs` (metadata included).

- :func:`knapsack_layer`: per-row bit-widths minimising a layer's error under a bit budget, a
  multiple-choice knapsack over rows (docs/allocation.md §2). Every row of a layer pays the same
  bits for the same option, so costs are integers with a common divisor; an exact dynamic
  programme over rows runs whenever ``rows × budget states`` is at most ``max_cells``. Above that
  (very wide layers) the Lagrangian convex-hull greedy is used: exact at every hull breakpoint,
  and between breakpoints it fills the leftover bits greedily (never above the budget).
- :func:`layer_curve`: the Pareto points of a layer's error-vs-bits curve under one pattern, the
  candidates of the DP over layers (:mod:`automl_compress.database.allocate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from automl_compress.config import CostConfig
from automl_compress.database.tables import LayerTable
from automl_compress.errors import InfeasibleBudgetError, InvalidInputError

MAX_DP_CELLS = 20_000_000
# the environments run the in-layer knapsack inside every step: the exact DP up to this many
# rows x budget-states cells, the convex-hull greedy above (exact at hull breakpoints, within one
# row's option of the optimum)
ENV_DP_CELLS = 200_000
CURVE_POINTS = 256


def pattern_index(table: LayerTable, pattern: str) -> int:
    """The index of ``pattern`` in the table's patterns.

    Raises:
        InvalidInputError: the layer has no such pattern.
    """
    if pattern not in table.patterns:
        raise InvalidInputError(
            f"pattern {pattern!r} is not available for layer {table.info.name!r}; expected one of "
            f"{list(table.patterns)} (N:M patterns that do not divide the columns are absent)"
        )
    return table.patterns.index(pattern)


def _costs_and_errors(
    table: LayerTable, pattern: str, cost: CostConfig | None
) -> tuple[np.ndarray, np.ndarray]:
    p = pattern_index(table, pattern)
    c = table.option_bits(cost)[p]
    e = np.asarray(table.errors[:, p, :], dtype=np.float64)
    return c, e


def _unit(c: np.ndarray) -> int:
    ints = [int(round(v)) for v in c if v > 0]
    if not ints or any(abs(v - round(v)) > 1e-9 for v in c):
        return 1
    g = 0
    for v in ints:
        g = math.gcd(g, v)
    return max(g, 1)


def _dp_rows(e: np.ndarray, u: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact DP: ``f[t]`` = min error with total cost exactly t units, and the argmin choices."""
    rows, n_opt = e.shape
    f = np.full(cap + 1, np.inf)
    f[0] = 0.0
    choice = np.zeros((rows, cap + 1), dtype=np.int8)
    for r in range(rows):
        g = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, dtype=np.int8)
        for j in range(n_opt):
            uj = int(u[j])
            if uj > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[uj:] = f[: cap + 1 - uj] + e[r, j]
            better = cand < g
            g[better] = cand[better]
            arg[better] = j
        f = g
        choice[r] = arg
    return f, choice


def _backtrack(choice: np.ndarray, u: np.ndarray, t: int) -> np.ndarray:
    rows = choice.shape[0]
    pick = np.zeros(rows, dtype=np.int64)
    for r in range(rows - 1, -1, -1):
        j = int(choice[r, t])
        pick[r] = j
        t -= int(u[j])
    return pick


@dataclass(frozen=True)
class _Hull:
    start: np.ndarray  # (rows,) option index each row starts from (the cheapest)
    step_row: np.ndarray  # upgrade steps sorted by benefit per bit, best first
    step_to: np.ndarray
    step_dc: np.ndarray
    step_de: np.ndarray


def _hull(e: np.ndarray, c: np.ndarray) -> _Hull:
    rows, _ = e.shape
    order = np.argsort(c, kind="stable")
    cheapest = c[order[0]]
    starts = np.zeros(rows, dtype=np.int64)
    sr, st, sdc, sde = [], [], [], []
    for r in range(rows):
        # lower convex hull of (cost, error) over the row's options, keeping only improvements
        pts: list[int] = []
        for j in order:
            if pts and c[j] == c[pts[-1]]:
                if e[r, j] < e[r, pts[-1]]:
                    pts[-1] = j
                continue
            if pts and e[r, j] >= e[r, pts[-1]]:
                continue
            while len(pts) >= 2:
                a, b = pts[-2], pts[-1]
                s1 = (e[r, b] - e[r, a]) / (c[b] - c[a])
                s2 = (e[r, j] - e[r, b]) / (c[j] - c[b])
                if s2 <= s1:
                    pts.pop()
                else:
                    break
            pts.append(int(j))
        # pts[0] must be a cheapest option: feasibility needs every row at the cheapest cost
        if c[pts[0]] != cheapest:
            pts.insert(0, int(order[0]))
        starts[r] = pts[0]
        for a, b in zip(pts[:-1], pts[1:], strict=False):
            sr.append(r)
            st.append(b)
            sdc.append(c[b] - c[a])
            sde.append(e[r, b] - e[r, a])
    sr_a, st_a = np.asarray(sr, dtype=np.int64), np.asarray(st, dtype=np.int64)
    sdc_a, sde_a = np.asarray(sdc, dtype=np.float64), np.asarray(sde, dtype=np.float64)
    # benefit per bit (error decrease); within a row the hull makes it non-increasing
    key = sde_a / np.maximum(sdc_a, 1e-300)
    idx = np.lexsort((st_a, sr_a, key))
    return _Hull(starts, sr_a[idx], st_a[idx], sdc_a[idx], sde_a[idx])


def _hull_greedy(e: np.ndarray, c: np.ndarray, budget: float) -> np.ndarray:
    h = _hull(e, c)
    pick = h.start.copy()
    used = float(c[pick].sum())
    blocked = np.zeros(e.shape[0], dtype=bool)
    for r, j, dc, de in zip(h.step_row, h.step_to, h.step_dc, h.step_de, strict=True):
        if blocked[r] or de >= 0:
            continue
        if used + dc <= budget + 1e-9:
            pick[r] = j
            used += dc
        else:
            blocked[r] = True  # later hull steps of this row depend on this one
    return pick


def _check_budget(table: LayerTable, c: np.ndarray, budget_bits: float) -> None:
    minimum = table.info.rows * float(c.min())
    if budget_bits < minimum - 1e-9:
        numel = max(table.info.numel, 1)
        raise InfeasibleBudgetError(
            budget_bits / numel,
            minimum / numel,
            detail=f"layer {table.info.name!r}: {budget_bits:.0f} bits asked, at least "
            f"{minimum:.0f} needed",
        )


def knapsack_layer(
    table: LayerTable,
    pattern: str,
    budget_bits: float,
    cost: CostConfig | None = None,
    max_cells: int = MAX_DP_CELLS,
) -> np.ndarray:
    """Per-row bit-widths minimising the layer error with total row bits <= ``budget_bits``.

    Args:
        table: the layer's error table.
        pattern: one of ``table.patterns``.
        budget_bits: total bits for the layer's rows (metadata included, docs/allocation.md §1).
        cost: size accounting (default :class:`CostConfig`).
        max_cells: the exact DP runs when ``rows × (budget states)`` is at most this; above it the
            convex-hull greedy is used (exact at hull breakpoints).

    Returns:
        (rows,) int64 array of bit-widths from ``table.bits``.

    Raises:
        InfeasibleBudgetError: the budget is below ``rows ×`` the cheapest option.
        InvalidInputError: the pattern is not in the table.
    """
    c, e = _costs_and_errors(table, pattern, cost)
    _check_budget(table, c, budget_bits)
    rows = table.info.rows
    g = _unit(c)
    u = np.rint(c / g).astype(np.int64)
    cap = int(min(math.floor(budget_bits / g + 1e-9), rows * int(u.max())))
    bits = np.asarray(table.bits, dtype=np.int64)
    if rows * (cap + 1) <= max_cells and abs(g * u - c).max() < 1e-9:
        f, choice = _dp_rows(e, u, cap)
        t = int(np.argmin(f))
        return bits[_backtrack(choice, u, t)]
    return bits[_hull_greedy(e, c, budget_bits)]


def layer_curve(
    table: LayerTable,
    pattern: str,
    cost: CostConfig | None = None,
    max_points: int = CURVE_POINTS,
    max_cells: int = MAX_DP_CELLS,
) -> tuple[np.ndarray, np.ndarray]:
    """A layer's error-vs-bits curve under one pattern (Pareto points, at most ``max_points``).

    Every returned point (bits, error) is reached by :func:`knapsack_layer` at that budget with an
    error no larger than the one listed.

    Returns:
        (costs, errors): ascending total row bits and descending errors.
    """
    c, e = _costs_and_errors(table, pattern, cost)
    rows = table.info.rows
    g = _unit(c)
    u = np.rint(c / g).astype(np.int64)
    cap = rows * int(u.max())
    if rows * (cap + 1) <= max_cells and abs(g * u - c).max() < 1e-9:
        f, _ = _dp_rows(e, u, cap)
        costs = np.arange(cap + 1, dtype=np.float64) * g
        errs = f
    else:
        h = _hull(e, c)
        costs = float(c[h.start].sum()) + np.concatenate([[0.0], np.cumsum(h.step_dc)])
        errs = float(e[np.arange(rows), h.start].sum()) + np.concatenate(
            [[0.0], np.cumsum(h.step_de)]
        )
    ok = np.isfinite(errs)
    costs, errs = costs[ok], errs[ok]
    # Pareto filter: keep a point only if it beats every cheaper one
    keep = np.ones(len(errs), dtype=bool)
    best = np.inf
    for i in range(len(errs)):
        if not np.isfinite(best) or errs[i] < best - 1e-15 * max(abs(best), 1.0):
            best = errs[i]
        else:
            keep[i] = False
    costs, errs = costs[keep], errs[keep]
    if len(costs) > max_points:
        sel = np.unique(np.round(np.linspace(0, len(costs) - 1, max_points)).astype(np.int64))
        costs, errs = costs[sel], errs[sel]
    return costs, errs
