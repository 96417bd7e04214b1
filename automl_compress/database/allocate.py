"""Non-RL allocators over the layer database: exact knapsack in a layer, uniform, DP over layers.

Everything here reads :class:`~automl_compress.database.tables.LayerTable` objects only; nothing is
solved. Bits are counted by :mod:`automl_compress.database.costs` (metadata included), and budgets
are average bits per compressible weight (DESIGN.md §3).

- :func:`knapsack_layer`: per-row bit-widths minimising a layer's error under a bit budget, a
  multiple-choice knapsack over rows (ALGORITHMS.md §5.4). Every row of a layer pays the same bits
  for the same option, so costs are integers with a common divisor; an exact dynamic programme over
  rows runs whenever ``rows × budget states`` is at most ``max_cells``. Above that (very wide
  layers) the Lagrangian convex-hull greedy is used: exact at every hull breakpoint, and between
  breakpoints it fills the leftover bits greedily (never above the budget).
- :func:`allocate_uniform`: one (pattern, bit-width) everywhere, the lowest-error one that fits.
- :func:`allocate_dp`: OBC/SPDY-style DP over layers on each layer's exact error-vs-bits curve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from automl_compress.config import CostConfig
from automl_compress.database.costs import bops, kept_per_row
from automl_compress.database.tables import LayerTable
from automl_compress.errors import InfeasibleBudgetError, InvalidInputError
from automl_compress.plan import CompressionPlan, LayerPlan

MAX_DP_CELLS = 20_000_000
DP_RESOLUTION = 4000
CURVE_POINTS = 256


# ---------------------------------------------------------------------------------------------
# Within one layer


def _pattern_index(table: LayerTable, pattern: str) -> int:
    if pattern not in table.patterns:
        raise InvalidInputError(
            f"pattern {pattern!r} is not available for layer {table.info.name!r}; expected one of "
            f"{list(table.patterns)} (N:M patterns that do not divide the columns are absent)"
        )
    return table.patterns.index(pattern)


def _costs_and_errors(
    table: LayerTable, pattern: str, cost: CostConfig | None
) -> tuple[np.ndarray, np.ndarray]:
    p = _pattern_index(table, pattern)
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
        budget_bits: total bits for the layer's rows (metadata included, DESIGN.md §3).
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


# ---------------------------------------------------------------------------------------------
# Whole model


def _total_weights(tables: Sequence[LayerTable]) -> int:
    n = sum(t.info.numel for t in tables)
    if n == 0:
        raise InvalidInputError("allocators need at least one layer table with weights, found none")
    return n


def min_feasible_avg_bits(tables: Sequence[LayerTable], cost: CostConfig | None = None) -> float:
    """The smallest average bits any plan over these tables can reach (cheapest option per row)."""
    total = sum(t.info.rows * float(t.option_bits(cost).min()) for t in tables)
    return total / _total_weights(tables)


def plan_bits(plan: CompressionPlan, tables: Sequence[LayerTable], cost=None) -> float:
    """Total weight bits of a plan (metadata included)."""
    total = 0.0
    for t in tables:
        lp = plan.layers[t.info.name]
        ob = t.option_bits(cost)[_pattern_index(t, lp.pattern)]
        idx = np.searchsorted(np.asarray(t.bits), np.asarray(lp.row_bits))
        total += float(ob[idx].sum())
    return total


def plan_avg_bits(plan: CompressionPlan, tables: Sequence[LayerTable], cost=None) -> float:
    """Average bits per compressible weight of a plan (metadata included)."""
    return plan_bits(plan, tables, cost) / _total_weights(tables)


def plan_error(plan: CompressionPlan, tables: Sequence[LayerTable]) -> float:
    """Proxy error of a plan: the sum of its table entries over all layers."""
    return float(
        sum(t.error_of(plan.layers[t.info.name].pattern, plan.layers[t.info.name].row_bits)
            for t in tables)
    )


def plan_bops(plan: CompressionPlan, tables: Sequence[LayerTable], cost=None) -> float:
    """Bit operations of a plan: per row, MACs × kept fraction × weight bits × activation bits.

    ``LayerInfo.macs`` counts one calibration item's multiply-accumulates of the whole layer; each
    row does ``macs / rows`` of them, scaled by the share of weights its pattern keeps (0 for a
    removed row).
    """
    cost = cost or CostConfig()
    total = 0.0
    for t in tables:
        lp = plan.layers[t.info.name]
        keep = kept_per_row(t.info.cols, lp.pattern) / max(t.info.cols, 1)
        per_row = t.info.macs / max(t.info.rows, 1) * keep
        total += sum(bops(per_row, b, cost.activation_bits) for b in lp.row_bits if b > 0)
    return total


def _raise_if_infeasible(tables, budget_avg_bits, cost) -> None:
    minimum = min_feasible_avg_bits(tables, cost)
    if budget_avg_bits < minimum - 1e-12:
        raise InfeasibleBudgetError(budget_avg_bits, minimum)


def uniform_candidates(
    tables: Sequence[LayerTable], cost: CostConfig | None = None
) -> list[tuple[str, int, float, float]]:
    """Every (pattern, bits > 0) that fits all layers: (pattern, bits, avg_bits, proxy error)."""
    out = []
    total = _total_weights(tables)
    common = [p for p in tables[0].patterns if all(p in t.patterns for t in tables)]
    for p in common:
        for b in tables[0].bits:
            if b == 0 or any(b not in t.bits for t in tables):
                continue
            bits = sum(t.info.rows * t.option_bits(cost)[t.patterns.index(p), t.bits.index(b)]
                       for t in tables)
            err = sum(float(t.errors[:, t.patterns.index(p), t.bits.index(b)].sum())
                      for t in tables)
            out.append((p, int(b), float(bits) / total, err))
    return out


def allocate_uniform(
    tables: Sequence[LayerTable],
    budget_avg_bits: float,
    cost: CostConfig | None = None,
    patterns: Sequence[str] | None = None,
) -> CompressionPlan:
    """The same (pattern, bit-width) in every row of every layer: the lowest-error one that fits.

    Args:
        tables: layer tables (forward order).
        budget_avg_bits: the budget in average bits per compressible weight.
        cost: size accounting.
        patterns: restrict the patterns tried (e.g. ``("dense",)``); default all common ones.

    Raises:
        InfeasibleBudgetError: no uniform option fits; states the smallest uniform budget.
    """
    cands = [c for c in uniform_candidates(tables, cost) if patterns is None or c[0] in patterns]
    if not cands:
        raise InvalidInputError("uniform allocation needs a bit-width > 0 in the menu, found none")
    fits = [c for c in cands if c[2] <= budget_avg_bits + 1e-12]
    if not fits:
        raise InfeasibleBudgetError(
            budget_avg_bits, min(c[2] for c in cands), detail="uniform: one bit-width everywhere"
        )
    p, b, avg, err = min(fits, key=lambda c: (c[3], -c[2]))
    layers = {t.info.name: LayerPlan(p, (b,) * t.info.rows) for t in tables}
    return CompressionPlan(
        layers, meta={"method": "uniform", "budget_bits": float(budget_avg_bits), "pattern": p,
                      "bits": b}
    )


Candidates = list[list[tuple[str, float, float]]]


def dp_candidates(tables: Sequence[LayerTable], cost: CostConfig | None = None,
                  max_cells: int = MAX_DP_CELLS) -> Candidates:
    """Per layer, the DP's candidates: every pattern's within-layer knapsack curve points as
    (pattern, total row bits, error). Computed once and reused by repeated DP solves
    (:func:`allocate_dp`'s ``candidates``, the SPDY search)."""
    return [layer_candidates(t, cost, max_cells) for t in tables]


def layer_candidates(table: LayerTable, cost: CostConfig | None = None,
                     max_cells: int = MAX_DP_CELLS) -> list[tuple[str, float, float]]:
    """One layer's DP candidates (see :func:`dp_candidates`)."""
    pts = []
    for p in table.patterns:
        cs, es = layer_curve(table, p, cost, max_cells=max_cells)
        pts.extend((p, float(ci), float(ei)) for ci, ei in zip(cs, es, strict=True))
    return pts


def realise(tables: Sequence[LayerTable], picks: Sequence[tuple[str, float]],
            cost: CostConfig | None = None, meta: dict | None = None,
            max_cells: int = MAX_DP_CELLS, memo: dict | None = None) -> CompressionPlan:
    """The plan that gives each layer its (pattern, bit budget) by :func:`knapsack_layer`.

    ``memo`` (a dict kept by the caller for one set of tables) stores each layer's knapsack
    solutions, so repeated solves (searches) do each (layer, pattern, budget) once.
    """
    layers = {}
    for i, (t, (p, ci)) in enumerate(zip(tables, picks, strict=True)):
        key = (i, p, float(ci))
        if memo is not None and key in memo:
            lp = memo[key]
        else:
            rb = knapsack_layer(t, p, ci, cost, max_cells)
            lp = LayerPlan(p, tuple(int(b) for b in rb))
            if memo is not None:
                memo[key] = lp
        layers[t.info.name] = lp
    return CompressionPlan(layers, meta=dict(meta or {}))


def allocate_dp(
    tables: Sequence[LayerTable],
    budget_avg_bits: float,
    cost: CostConfig | None = None,
    layer_weights: Sequence[float] | np.ndarray | None = None,
    resolution: int = DP_RESOLUTION,
    candidates: Candidates | None = None,
    max_cells: int = MAX_DP_CELLS,
    memo: dict | None = None,
) -> CompressionPlan:
    """DP over layers on each layer's exact error-vs-bits curve (OBC/SPDY style).

    Each layer's candidates are the Pareto points of its within-layer knapsack curve for every
    pattern; the budget is split into ``resolution`` buckets and each candidate's bits are rounded
    *up* to whole buckets, so the plan never exceeds the budget. The chosen layer budgets are then
    realised exactly by :func:`knapsack_layer`.

    Args:
        tables: layer tables (forward order), weighted by the objective.
        budget_avg_bits: budget in average bits per compressible weight.
        cost: size accounting.
        layer_weights: optional per-layer multipliers of the error (the SPDY coefficients).
        resolution: number of budget buckets.
        candidates: :func:`dp_candidates` of these tables (computed here when None).
        max_cells: the in-layer knapsack's exact-DP limit (:func:`knapsack_layer`).
        memo: knapsack solutions of earlier solves over the same tables (see :func:`realise`).

    Raises:
        InfeasibleBudgetError: the budget is below :func:`min_feasible_avg_bits`.
    """
    tables = list(tables)
    _raise_if_infeasible(tables, budget_avg_bits, cost)
    w = np.ones(len(tables)) if layer_weights is None else np.asarray(layer_weights, float)
    if w.shape != (len(tables),) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise InvalidInputError(
            f"layer_weights must be {len(tables)} finite numbers >= 0, found {w.tolist()}"
        )
    cands = dp_candidates(tables, cost) if candidates is None else candidates
    total_budget = budget_avg_bits * _total_weights(tables)
    delta = total_budget / resolution if total_budget > 0 else 1.0
    T = resolution
    F = np.zeros(T + 1)
    choices: list[np.ndarray] = []
    t = np.arange(T + 1)
    for li, pts in enumerate(cands):
        # G[t] = min_k F[t − units_k] + w·e_k over the layer's candidates, all k at once
        units = np.array([math.ceil(ci / delta - 1e-9) if ci > 0 else 0 for _, ci, _ in pts])
        errs = np.array([ei for _, _, ei in pts])
        src = t[None, :] - units[:, None]  # (candidates, T+1)
        vals = np.where(src >= 0, F[np.clip(src, 0, T)], np.inf) + w[li] * errs[:, None]
        arg = np.argmin(vals, axis=0)  # the first minimum, as a strict-improvement scan keeps
        F = vals[arg, t]
        arg[~np.isfinite(F)] = -1
        choices.append(arg)
    if not np.isfinite(F[T]):
        # the bucket rounding cost too much: only possible right at the feasibility limit
        raise InfeasibleBudgetError(
            budget_avg_bits, min_feasible_avg_bits(tables, cost),
            detail=f"after rounding to {resolution} budget buckets; raise the budget slightly",
        )
    t_left = T
    picks: list[tuple[str, float]] = [("dense", 0.0)] * len(tables)
    for li in range(len(tables) - 1, -1, -1):
        k = int(choices[li][t_left])
        p, ci, _ = cands[li][k]
        picks[li] = (p, ci)
        t_left -= int(math.ceil(ci / delta - 1e-9)) if ci > 0 else 0
    plan = realise(tables, picks, cost, {"method": "dp", "budget_bits": float(budget_avg_bits)},
                   max_cells, memo)
    used = plan_avg_bits(plan, tables, cost)
    if used > budget_avg_bits + 1e-9:  # guard the contract; unreachable by construction
        raise AssertionError(f"dp plan uses {used} avg bits > budget {budget_avg_bits}")
    return plan
