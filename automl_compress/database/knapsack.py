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
# the most bytes one kept knapsack table may hold (knapsack_layer's ``tables``), its least errors
# and its choices, stored as int8 cells or as runs along the cost axis, whichever is smaller
KEPT_TABLE_BYTES = 2 << 20
# the environments keep tables per group-multiplier vector, so many more of them: int8 cells only,
# 1 MiB each
ENV_KEPT_BYTES = 1 << 20


class KeptTables(dict):
    """One layer table's kept knapsack state, with the limits of what it keeps.

    Exact DP tables by pattern, hull steps by ``("hull", pattern)``: the ``tables`` argument of
    :func:`knapsack_layer` and :func:`layer_curve` (a plain dict keeps with the defaults).

    Args:
        max_bytes: the most bytes one kept item may hold.
        runs: whether a DP table past ``max_bytes`` in int8 cells may be kept as runs
            (:class:`ChoiceRuns`).
        curve_choices: whether :func:`layer_curve` builds its DP with the choices and keeps it
            (a caller that realises many budgets of one curve, the searches), or computes the
            least errors alone (half the vector operations) and leaves
            :func:`knapsack_layer` to build the choices up to the budget it is asked (a caller
            that realises about one budget per curve, the environments).
    """

    def __init__(self, max_bytes: int = KEPT_TABLE_BYTES, runs: bool = True,
                 curve_choices: bool = True) -> None:
        super().__init__()
        self.max_bytes, self.runs = int(max_bytes), bool(runs)
        self.curve_choices = bool(curve_choices)


def _limits(tables: dict) -> tuple[int, bool]:
    """(max_bytes, runs) of a kept-tables dict."""
    if isinstance(tables, KeptTables):
        return tables.max_bytes, tables.runs
    return KEPT_TABLE_BYTES, True


def _keeps_curves(tables: dict | None) -> bool:
    """Whether :func:`layer_curve` keeps its DP's choices in ``tables``."""
    if isinstance(tables, KeptTables):
        return tables.curve_choices
    return tables is not None


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


def _dp_rows(
    e: np.ndarray, u: np.ndarray, cap: int, choices: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """Exact DP: ``f[t]`` = min error with total cost exactly t units, and the argmin choices.

    After r rows only the costs ``[r·min u, r·max u]`` (clipped to ``cap``) can be finite, so
    each row's step reads and writes that window alone: about half the cells of the whole
    ``rows × (cap + 1)`` table; the cells outside stay infinite, their choice 0.

    With ``choices=False`` only ``f`` is computed (a plain running minimum per option: two
    vector operations where the scan with choices takes four; the same ``f`` bit for bit, a
    minimum of the same sums being exact in any order) and None stands for the choices.
    """
    rows, n_opt = e.shape
    f = np.full(cap + 1, np.inf)
    f[0] = 0.0
    choice = np.zeros((rows, cap + 1), dtype=np.int8) if choices else None
    fits = [(j, int(u[j])) for j in range(n_opt) if u[j] <= cap]
    if not fits:  # nothing fits: any row leaves every cost infinite
        if rows:
            f[0] = np.inf
        return f, choice
    u_lo, u_hi = min(uj for _, uj in fits), max(uj for _, uj in fits)
    g, cand = np.full(cap + 1, np.inf), np.empty(cap + 1)
    better = np.empty(cap + 1, dtype=bool)
    lo, hi = 0, 0  # the window of f that can be finite
    for r in range(rows):
        # g[t] = min_j f[t − u_j] + e[r, j], the first best option j kept on ties (a strict
        # improvement over the options in order; option 0 where every candidate is infinite)
        new_lo, new_hi = min(lo + u_lo, cap + 1), min(hi + u_hi, cap)
        if new_lo > new_hi:  # no cost up to cap is reachable any more
            f[:] = np.inf
            return f, choice
        g[new_lo : new_hi + 1] = np.inf
        for k, (j, uj) in enumerate(fits):
            s1 = min(hi, cap - uj)  # sources lo … s1 land on lo + u_j … s1 + u_j
            n = s1 - lo + 1
            if n <= 0:
                continue
            t0 = lo + uj
            if k == 0:  # the first option meets only infinities: it takes every cell it reaches
                np.add(f[lo : s1 + 1], e[r, j], out=g[t0 : t0 + n])
                if j and choice is not None:
                    choice[r, t0 : t0 + n] = np.where(np.isfinite(g[t0 : t0 + n]), j, 0)
                continue
            np.add(f[lo : s1 + 1], e[r, j], out=cand[:n])
            if choice is None:
                np.minimum(g[t0 : t0 + n], cand[:n], out=g[t0 : t0 + n])
                continue
            np.less(cand[:n], g[t0 : t0 + n], out=better[:n])
            np.copyto(g[t0 : t0 + n], cand[:n], where=better[:n])
            if j:
                np.copyto(choice[r, t0 : t0 + n], np.int8(j), where=better[:n])
        f, g = g, f
        lo, hi = new_lo, new_hi
    f[:lo] = np.inf
    return f, choice


@dataclass(frozen=True)
class ChoiceRuns:
    """A (rows, width) table of DP choices stored as runs along the cost axis.

    Row r's runs start at ``starts[offsets[r]:offsets[r + 1]]`` (ascending, the first at 0), each
    holding one choice of ``values``. An exact DP's choices change rarely along the cost axis
    (about 2 % of the cells of a MiniLM attention matrix's table), so the runs take a small part
    of the cells' bytes; a lookup is one binary search in the row's runs.
    """

    offsets: np.ndarray  # (rows + 1,) int64
    starts: np.ndarray  # (runs,) uint16 (int64 past 65,536 costs)
    values: np.ndarray  # (runs,) int8

    @classmethod
    def of(cls, choice: np.ndarray) -> ChoiceRuns:
        """The runs of ``choice`` (rows, width)."""
        rows, width = choice.shape
        change = np.ones(choice.shape, dtype=bool)
        np.not_equal(choice[:, 1:], choice[:, :-1], out=change[:, 1:])
        r, t = np.nonzero(change)  # row-major: by row, then by cost
        return cls(np.searchsorted(r, np.arange(rows + 1)).astype(np.int64),
                   t.astype(np.uint16 if width <= 1 << 16 else np.int64), choice[r, t])

    @property
    def shape(self) -> tuple[int, ...]:
        """(rows,), the rows of the table."""
        return (len(self.offsets) - 1,)

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return self.offsets.nbytes + self.starts.nbytes + self.values.nbytes

    def __getitem__(self, key: tuple[int, int]) -> int:
        r, t = key
        lo, hi = int(self.offsets[r]), int(self.offsets[r + 1])
        return int(self.values[lo + int(np.searchsorted(self.starts[lo:hi], t, "right")) - 1])


def _backtrack(choice: np.ndarray | ChoiceRuns, u: np.ndarray, t: int) -> np.ndarray:
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

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(a.nbytes for a in (self.start, self.step_row, self.step_to, self.step_dc,
                                      self.step_de))


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


def _kept_hull(e: np.ndarray, c: np.ndarray, pattern: str, tables: dict | None) -> _Hull:
    """The rows' hull steps of one pattern, kept in ``tables`` (a layer's kept tables)."""
    h = None if tables is None else tables.get(("hull", pattern))
    if h is None:
        h = _hull(e, c)
        if tables is not None and h.nbytes <= _limits(tables)[0]:
            tables[("hull", pattern)] = h
    return h


def _hull_greedy(h: _Hull, c: np.ndarray, budget: float) -> np.ndarray:
    pick = h.start.copy()
    used = float(c[pick].sum())
    blocked = np.zeros(len(pick), dtype=bool)
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


@dataclass(frozen=True)
class LayerKnapsack:
    """The exact in-layer DP of one (layer, pattern) over total costs ``0 … cap`` units.

    ``f[t]`` and the choices of a DP over ``0 … cap'`` are those of this one for every ``t ≤ cap'``
    (each entry depends on smaller costs only), so one table answers every budget up to ``cap``
    exactly as a DP run for that budget would: the searches and environments that realise many
    layer budgets (:func:`~automl_compress.database.allocate.realise`) build it once.
    """

    u: np.ndarray  # (options,) cost of each option in units
    bits: np.ndarray  # (options,) bit-width of each option
    f: np.ndarray  # (cap + 1,) least error at total cost exactly t units
    choice: np.ndarray | ChoiceRuns  # (rows, cap + 1) int8 option of each row on the optimal path

    @property
    def cap(self) -> int:
        """The widest total cost the table answers, in units."""
        return len(self.f) - 1

    @property
    def nbytes(self) -> int:
        """Bytes held (least errors and choices)."""
        return self.f.nbytes + self.choice.nbytes

    def kept(self, max_bytes: int, runs: bool) -> LayerKnapsack | None:
        """This table with its choices in the smaller form, if it fits ``max_bytes``; else None.

        Runs (:class:`ChoiceRuns`) are tried only when ``runs``.
        """
        dp = self
        if dp.nbytes > max_bytes and runs and isinstance(dp.choice, np.ndarray):
            choice_runs = ChoiceRuns.of(dp.choice)
            if choice_runs.nbytes < dp.choice.nbytes:
                dp = LayerKnapsack(dp.u, dp.bits, dp.f, choice_runs)
        return dp if dp.nbytes <= max_bytes else None

    def solve(self, cap: int) -> np.ndarray:
        """(rows,) bit-widths of the least-error assignment costing at most ``cap`` units."""
        t = int(np.argmin(self.f[: cap + 1]))
        return self.bits[_backtrack(self.choice, self.u, t)]


def _units(table: LayerTable, c: np.ndarray) -> tuple[int, np.ndarray, bool]:
    """Bits per cost unit, option costs in units, and whether the exact integer DP applies."""
    g = _unit(c)
    u = np.rint(c / g).astype(np.int64)
    return g, u, bool(abs(g * u - c).max() < 1e-9)


def _budget_cap(table: LayerTable, budget_bits: float, g: int, u: np.ndarray) -> int:
    return int(min(math.floor(budget_bits / g + 1e-9), table.info.rows * int(u.max())))


def _layer_knapsack(table: LayerTable, e: np.ndarray, u: np.ndarray, cap: int) -> LayerKnapsack:
    """The exact DP table of one pattern's errors ``e`` up to ``cap`` units."""
    f, choice = _dp_rows(e, u, cap)
    return LayerKnapsack(u, np.asarray(table.bits, dtype=np.int64), f, choice)


def knapsack_layer(
    table: LayerTable,
    pattern: str,
    budget_bits: float,
    cost: CostConfig | None = None,
    max_cells: int = MAX_DP_CELLS,
    tables: dict | None = None,
) -> np.ndarray:
    """Per-row bit-widths minimising the layer error with total row bits <= ``budget_bits``.

    Args:
        table: the layer's error table.
        pattern: one of ``table.patterns``.
        budget_bits: total bits for the layer's rows (metadata included, docs/allocation.md §1).
        cost: size accounting (default :class:`CostConfig`).
        max_cells: the exact DP runs when ``rows × (budget states)`` is at most this; above it the
            convex-hull greedy is used (exact at hull breakpoints).
        tables: a dict the caller keeps for this layer table: the exact DP is then built once
            per pattern, as far as ``max_cells`` and the dict's byte limit (a
            :class:`KeptTables`; a plain dict: :data:`KEPT_TABLE_BYTES`) allow, and every later
            budget within it is read off it (the same result as without); the hull greedy's
            steps are kept there too (under ``("hull", pattern)``).

    Returns:
        (rows,) int64 array of bit-widths from ``table.bits``.

    Raises:
        InfeasibleBudgetError: the budget is below ``rows ×`` the cheapest option.
        InvalidInputError: the pattern is not in the table.
    """
    c, e = _costs_and_errors(table, pattern, cost)
    _check_budget(table, c, budget_bits)
    rows = table.info.rows
    g, u, integer = _units(table, c)
    cap = _budget_cap(table, budget_bits, g, u)
    if not (integer and rows * (cap + 1) <= max_cells):
        h = _kept_hull(e, c, pattern, tables)
        return np.asarray(table.bits, dtype=np.int64)[_hull_greedy(h, c, budget_bits)]
    if tables is None:
        return _layer_knapsack(table, e, u, cap).solve(cap)
    dp = tables.get(pattern)
    if dp is None or dp.cap < cap:
        # as wide as asked the first time; at least twice as wide at every rebuild
        widest = min(rows * int(u.max()), max_cells // rows - 1)
        dp = _layer_knapsack(table, e, u, max(cap, min(2 * dp.cap if dp else 0, widest)))
        kept = dp.kept(*_limits(tables))
        if kept is not None:
            tables[pattern] = dp = kept
    return dp.solve(cap)


def _pareto(errs: np.ndarray) -> np.ndarray:
    """Mask of the Pareto points of a curve in cost order.

    A point is kept only if it beats every cheaper kept one by more than 1e-15 relative; the
    first point is always kept.
    """
    before = np.minimum.accumulate(np.concatenate([[np.inf], errs[:-1]]))
    finite = np.isfinite(before)
    margin = np.where(finite, 1e-15 * np.maximum(np.abs(np.where(finite, before, 0.0)), 1.0), 0.0)
    keep = ~finite | (errs < before - margin)
    if not np.any(~keep & (errs < before)):  # no point dropped by the tolerance alone
        return keep
    keep = np.ones(len(errs), dtype=bool)  # else the running best of the kept points only
    best = np.inf
    for i in range(len(errs)):
        if not np.isfinite(best) or errs[i] < best - 1e-15 * max(abs(best), 1.0):
            best = errs[i]
        else:
            keep[i] = False
    return keep


def layer_curve(
    table: LayerTable,
    pattern: str,
    cost: CostConfig | None = None,
    max_points: int = CURVE_POINTS,
    max_cells: int = MAX_DP_CELLS,
    tables: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A layer's error-vs-bits curve under one pattern (Pareto points, at most ``max_points``).

    Every returned point (bits, error) is reached by :func:`knapsack_layer` at that budget with an
    error no larger than the one listed. ``tables``: as for :func:`knapsack_layer`; the curve's
    exact DP is kept there (when it fits the dict's byte limit) for later budgets, unless it is a
    :class:`KeptTables` with ``curve_choices=False``. Without a dict to keep it in, or with
    such a one, only the DP's least errors are computed.

    Returns:
        (costs, errors): ascending total row bits and descending errors.
    """
    c, e = _costs_and_errors(table, pattern, cost)
    rows = table.info.rows
    g, u, integer = _units(table, c)
    cap = rows * int(u.max())
    if integer and rows * (cap + 1) <= max_cells:
        if _keeps_curves(tables):
            dp = _layer_knapsack(table, e, u, cap)
            kept = dp.kept(*_limits(tables))
            if kept is not None:
                tables[pattern] = kept
            errs = dp.f
        else:
            errs, _ = _dp_rows(e, u, cap, choices=False)
        costs = np.arange(cap + 1, dtype=np.float64) * g
    else:
        h = _kept_hull(e, c, pattern, tables)
        costs = float(c[h.start].sum()) + np.concatenate([[0.0], np.cumsum(h.step_dc)])
        errs = float(e[np.arange(rows), h.start].sum()) + np.concatenate(
            [[0.0], np.cumsum(h.step_de)]
        )
    ok = np.isfinite(errs)
    costs, errs = costs[ok], errs[ok]
    keep = _pareto(errs)
    costs, errs = costs[keep], errs[keep]
    if len(costs) > max_points:
        sel = np.unique(np.round(np.linspace(0, len(costs) - 1, max_points)).astype(np.int64))
        costs, errs = costs[sel], errs[sel]
    return costs, errs
