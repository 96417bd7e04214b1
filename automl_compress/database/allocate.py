"""Non-RL allocators over the layer database: uniform, and the DP over layers; plan accounting.

Everything here reads :class:`~automl_compress.database.tables.LayerTable` objects only; nothing is
solved. Bits are counted by :mod:`automl_compress.database.costs` (metadata included), and budgets
are average bits per compressible weight (docs/allocation.md §1). Within one layer the bits are
placed by the exact knapsack of :mod:`automl_compress.database.knapsack` (:func:`knapsack_layer`,
:func:`layer_curve` and its limits are importable from here too).

- :func:`allocate_uniform`: one (pattern, bit-width) everywhere, the lowest-error one that fits.
- :func:`allocate_dp`: OBC/SPDY-style DP over layers on each layer's exact error-vs-bits curve.
- :func:`plan_bits`, :func:`plan_avg_bits`, :func:`plan_error`, :func:`min_feasible_avg_bits`:
  what a plan costs and how much table error it has.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from automl_compress.config import CostConfig
from automl_compress.database.knapsack import (
    MAX_DP_CELLS,
    knapsack_layer,
    layer_curve,
    pattern_index,
)
from automl_compress.database.tables import LayerTable
from automl_compress.errors import InfeasibleBudgetError, InvalidInputError
from automl_compress.plan import CompressionPlan, LayerPlan

__all__ = [
    "DP_RESOLUTION",
    "Candidates",
    "allocate_dp",
    "allocate_uniform",
    "dp_candidates",
    "layer_candidates",
    "min_feasible_avg_bits",
    "plan_avg_bits",
    "plan_bits",
    "plan_error",
    "realise",
    "uniform_candidates",
]

DP_RESOLUTION = 4000
# a DP step over at most this many (candidate, cost) cells is one gather and one minimum over a
# table; a larger one is a shifted minimum per candidate (no table of that size)
GATHER_CELLS = 1 << 16


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
        ob = t.option_bits(cost)[pattern_index(t, lp.pattern)]
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
    """Per layer, the DP's candidates.

    Every pattern's within-layer knapsack curve points as (pattern, total row bits, error). Computed
    once and reused by repeated DP solves (:func:`allocate_dp`'s ``candidates``, the SPDY search).
    """
    return [layer_candidates(t, cost, max_cells) for t in tables]


def layer_candidates(table: LayerTable, cost: CostConfig | None = None,
                     max_cells: int = MAX_DP_CELLS,
                     tables: dict | None = None) -> list[tuple[str, float, float]]:
    """One layer's DP candidates (see :func:`dp_candidates`).

    ``tables``: as for :func:`~automl_compress.database.knapsack.layer_curve`.
    """
    pts = []
    for p in table.patterns:
        cs, es = layer_curve(table, p, cost, max_cells=max_cells, tables=tables)
        pts.extend((p, float(ci), float(ei)) for ci, ei in zip(cs, es, strict=True))
    return pts


def knapsack_memo(layer_tables: Sequence[dict]) -> dict:
    """A fresh ``memo`` for :func:`realise` / :func:`allocate_dp`.

    Layer i keeps its knapsack tables in ``layer_tables[i]``, a dict the caller may share between
    the memos of the same weighted layer table.
    """
    return {("dp", i): kept for i, kept in enumerate(layer_tables)}


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
            dp_tables = None if memo is None else memo.setdefault(("dp", i), {})
            rb = knapsack_layer(t, p, ci, cost, max_cells, dp_tables)
            lp = LayerPlan(p, tuple(int(b) for b in rb))
            if memo is not None:
                memo[key] = lp
        layers[t.info.name] = lp
    return CompressionPlan(layers, meta=dict(meta or {}))


def _can_win(units: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Indices (ascending) of the candidates that can be a DP step's first minimum.

    F is non-increasing in t (more budget never costs error), so candidate j never wins at any t
    when some i has u_i ≤ u_j and c_i < c_j (i is strictly better wherever j is feasible), or
    u_i ≤ u_j, c_i ≤ c_j and i < j (i ties and comes first). Dropping those leaves the DP's
    choices, tie-breaking included, exactly as over all candidates.
    """
    order = np.lexsort((np.arange(len(units)), cost, units))
    c_sorted = cost[order]
    before = np.minimum.accumulate(np.concatenate([[math.inf], c_sorted[:-1]]))
    if not np.any(c_sorted == before):  # no ties with the best so far: the strict rule alone
        return np.sort(order[c_sorted < before])
    keep = []
    best, best_idx = math.inf, -1  # min cost so far, and the smallest index reaching it
    for j in order.tolist():
        c = float(cost[j])
        if c < best:
            best, best_idx = c, j
            keep.append(j)
        elif c == best and j < best_idx:
            best_idx = j
            keep.append(j)
    return np.sort(np.asarray(keep, dtype=np.int64))


def _candidate_arrays(pts: list, li: int, memo: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """(bits, errors) of one layer's candidates, kept in ``memo`` for the same candidate list."""
    kept = None if memo is None else memo.get(("candidates", li))
    if kept is not None and kept[0] is pts:
        return kept[1], kept[2]
    bits = np.array([ci for _, ci, _ in pts], dtype=np.float64)
    errs = np.array([ei for _, _, ei in pts], dtype=np.float64)
    if memo is not None:
        memo[("candidates", li)] = (pts, bits, errs)
    return bits, errs


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
    layers = []  # per layer: the units and costs of its candidates that can win
    for li, pts in enumerate(cands):
        bits, errs = _candidate_arrays(pts, li, memo)
        units = np.where(bits > 0, np.ceil(bits / delta - 1e-9), 0).astype(np.int64)
        cost_k = w[li] * errs
        keep = _can_win(units, cost_k)
        layers.append((np.minimum(units[keep], T + 1), cost_k[keep], keep))
    # after layer l only the costs t ≥ T − (the later layers' largest units) can still end at T:
    # G is computed there alone, and the backtrack reads nothing below it
    later = np.concatenate([np.cumsum([int(u.max(initial=0)) for u, _, _ in layers][::-1])[::-1],
                            [0]])
    F = np.zeros(T + 1)
    steps = []  # per layer: F before it, the units and costs of its candidates that can win
    for li, (u, c, keep) in enumerate(layers):
        # G[t] = min_k F[t − units_k] + w·e_k over the layer's candidates that can win
        steps.append((F, u, c, keep))
        lo = max(T - int(later[li + 1]), 0)
        G = np.full(T + 1, np.inf)  # F[s] for s < 0 is infeasible
        if len(u) * (T + 1 - lo) <= GATHER_CELLS:  # a small step: one (K, window) table
            src = np.arange(lo, T + 1)[None, :] - u[:, None]
            vals = np.where(src >= 0, F[np.maximum(src, 0)], np.inf) + c[:, None]
            G[lo:] = vals.min(axis=0)
            F = G
            continue
        tmp = np.empty(T + 1)
        for uk, ck in zip(u.tolist(), c.tolist(), strict=True):
            t0 = max(uk, lo)
            if t0 <= T:
                n = T + 1 - t0
                np.add(F[t0 - uk : t0 - uk + n], ck, out=tmp[:n])
                np.minimum(G[t0:], tmp[:n], out=G[t0:])
        F = G
    if not np.isfinite(F[T]):
        # the bucket rounding cost too much: only possible right at the feasibility limit
        raise InfeasibleBudgetError(
            budget_avg_bits, min_feasible_avg_bits(tables, cost),
            detail=f"after rounding to {resolution} budget buckets; raise the budget slightly",
        )
    t_left = T
    picks: list[tuple[str, float]] = [("dense", 0.0)] * len(tables)
    for li in range(len(tables) - 1, -1, -1):
        F_prev, u, c, keep = steps[li]
        src = t_left - u
        vals = np.where(src >= 0, F_prev[np.maximum(src, 0)], np.inf) + c
        j = int(np.argmin(vals))  # the first minimum, as a strict-improvement scan keeps
        p, ci, _ = cands[li][int(keep[j])]
        picks[li] = (p, ci)
        t_left -= int(u[j])
    plan = realise(tables, picks, cost, {"method": "dp", "budget_bits": float(budget_avg_bits)},
                   max_cells, memo)
    used = plan_avg_bits(plan, tables, cost)
    if used > budget_avg_bits + 1e-9:  # guard the contract; unreachable by construction
        raise AssertionError(f"dp plan uses {used} avg bits > budget {budget_avg_bits}")
    return plan
