"""EvoPress-style (1+λ) evolutionary search over per-layer budgets, scored on the true metric.

After Sieberling et al., "EvoPress: Towards Optimal Dynamic Model Compression via Evolutionary
Search" (arXiv 2410.14649); docs/objectives.md, "Searches". The genome is, per layer, a pattern
and a bit budget; the exact within-layer knapsack (:func:`~automl_compress.database.allocate.
knapsack_layer`) turns it into per-row bit-widths, so every genome is a feasible plan.

- **Start**: the calibrated DP plan (its patterns and the bits each layer uses).
- **Mutation** (budget-neutral): 1–3 level switches, each moving ``step · min(numel_i, numel_j)``
  bits (``step`` ∈ {1/8, 1/4, 1/2, 1} bits per weight) from a donor layer i to a receiver layer j,
  clipped so the donor stays at or above its cheapest cost and the receiver at or below its
  dearest; with probability 1/4 also one layer switches pattern (its budget clipped into the new
  pattern's range; what is clipped returns to a pool that later switches can hand out). The total
  never exceeds the budget.
- **Selection**: λ offspring per generation, scored on the first ``stages[0]`` of the validation
  split; the better half goes on to ``stages[1]``, and so on; the survivor of the last stage (the
  whole split) replaces the parent only if it scores higher. Each stage's candidates are scored
  as one batch (:meth:`~automl_compress.search.evaluator.Evaluator.many`: in parallel on a Ray
  executor, with the same result and the same counts as one by one).

Why a short loop of our own and not nevergrad / cma / evotorch: their mutation operators act on
unconstrained continuous or independent discrete variables, while this search needs mutations
that keep a shared budget exactly, and multi-stage selection tied to a counted evaluation budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from automl_compress.config import CostConfig
from automl_compress.database.allocate import realise
from automl_compress.database.tables import LayerTable
from automl_compress.plan import CompressionPlan
from automl_compress.search.evaluator import BudgetSpent, Evaluator
from automl_compress.search.result import SearchResult

STEPS = (0.125, 0.25, 0.5, 1.0)
PATTERN_SWITCH = 0.25


@dataclasses.dataclass(frozen=True)
class Genome:
    """Per layer: the pattern and the bits its rows may spend; ``pool``: bits nobody holds."""

    patterns: tuple[str, ...]
    budgets: tuple[float, ...]
    pool: float = 0.0


class _Ranges:
    """Each layer's cheapest and dearest total cost under each of its patterns."""

    def __init__(self, tables: Sequence[LayerTable], cost: CostConfig | None) -> None:
        self.tables = list(tables)
        self.lo: list[dict[str, float]] = []
        self.hi: list[dict[str, float]] = []
        for t in self.tables:
            ob = t.option_bits(cost)
            self.lo.append({p: t.info.rows * float(ob[i].min()) for i, p in
                            enumerate(t.patterns)})
            self.hi.append({p: t.info.rows * float(ob[i].max()) for i, p in
                            enumerate(t.patterns)})
        self.numel = np.array([t.info.numel for t in self.tables], dtype=np.float64)


def genome_of(plan: CompressionPlan, tables: Sequence[LayerTable], cost: CostConfig | None,
              budget_bits: float) -> Genome:
    """The genome of a plan: its patterns and the bits each layer's rows use."""
    pats, buds = [], []
    for t in tables:
        lp = plan.layers[t.info.name]
        ob = t.option_bits(cost)[t.patterns.index(lp.pattern)]
        idx = np.searchsorted(np.asarray(t.bits), np.asarray(lp.row_bits))
        pats.append(lp.pattern)
        buds.append(float(ob[idx].sum()))
    return Genome(tuple(pats), tuple(buds), max(budget_bits - sum(buds), 0.0))


def mutate(g: Genome, r: _Ranges, rng: np.random.Generator) -> Genome:
    """One offspring: 1–3 budget-neutral level switches and, sometimes, a pattern switch."""
    pats, buds, pool = list(g.patterns), list(g.budgets), g.pool
    n = len(buds)
    if rng.random() < PATTERN_SWITCH:
        i = int(rng.integers(n))
        choices = [p for p in r.tables[i].patterns if p != pats[i]]
        if choices:
            pats[i] = choices[int(rng.integers(len(choices)))]
            clipped = float(np.clip(buds[i], r.lo[i][pats[i]], r.hi[i][pats[i]]))
            pool += buds[i] - clipped
            buds[i] = clipped
            if pool < 0:  # the new pattern's floor needs bits: take them from the others
                if not _refill(buds, pats, r, -pool):
                    return g
                pool = 0.0
    # level switches between any two holders of bits; the pool is holder n (no floor, no cap)
    vals = [*buds, pool]
    lo = [r.lo[k][pats[k]] for k in range(n)] + [0.0]
    hi = [r.hi[k][pats[k]] for k in range(n)] + [np.inf]
    size = [*r.numel.tolist(), np.inf]
    for _ in range(int(rng.integers(1, 4))):
        i, j = (int(x) for x in rng.choice(n + 1, size=2, replace=False))
        step = STEPS[int(rng.integers(len(STEPS)))]
        give = min(step * min(size[i], size[j]), vals[i] - lo[i], hi[j] - vals[j])
        if give > 0:
            vals[i] -= give
            vals[j] += give
    buds, pool = vals[:n], vals[n]
    return Genome(tuple(pats), tuple(buds), max(pool, 0.0))


def _refill(buds: list[float], pats: list[str], r: _Ranges, need: float) -> bool:
    """Take ``need`` bits from layers above their floor (largest headroom first), in place."""
    head = sorted(range(len(buds)), key=lambda k: buds[k] - r.lo[k][pats[k]], reverse=True)
    for k in head:
        take = min(need, buds[k] - r.lo[k][pats[k]])
        buds[k] -= take
        need -= take
        if need <= 1e-9:
            return True
    return False


def evo_search(
    tables: Sequence[LayerTable], budget_bits: float, start: CompressionPlan,
    evaluator: Evaluator, cost: CostConfig | None = None, offspring: int = 8,
    stages: Sequence[float] = (0.25, 0.5, 1.0), seed: int = 0,
) -> SearchResult:
    """(1+λ) evolution of per-layer budgets from ``start``, until the evaluator's budget is spent.

    Args:
        tables: the objective-weighted layer tables (forward order).
        budget_bits: the budget in average bits per compressible weight.
        start: the warm start (the calibrated DP plan); scored first.
        evaluator: the counting validation scorer (its budget ends the search).
        cost: size accounting.
        offspring: λ, candidates per generation.
        stages: validation fractions of the multi-stage selection (ascending, last 1.0).
        seed: the mutation RNG's seed.

    Returns:
        The best plan; never worse than ``start`` on the validation split.
    """
    tables = list(tables)
    r = _Ranges(tables, cost)
    total = budget_bits * float(r.numel.sum())
    rng = np.random.default_rng(seed)
    memo: dict[tuple, CompressionPlan] = {}
    layer_memo: dict = {}

    def plan_of(g: Genome) -> CompressionPlan:
        key = (g.patterns, tuple(int(b) for b in g.budgets))
        if key not in memo:
            memo[key] = realise(tables, list(zip(g.patterns, g.budgets, strict=True)), cost,
                                {"method": "evo", "budget_bits": float(budget_bits)},
                                memo=layer_memo)
        return memo[key]

    parent = genome_of(start, tables, cost, total)
    best_plan = start
    best = start_val = evaluator(start, 1.0)
    history = [(evaluator.spent, best)]
    try:
        while True:
            kids, seen = [], {best_plan.key()}
            for _ in range(offspring * 4):
                if len(kids) == offspring:
                    break
                g = mutate(parent, r, rng)
                p = plan_of(g)
                if p.key() not in seen:
                    seen.add(p.key())
                    kids.append((g, p))
            if not kids:
                break
            for s, frac in enumerate(stages):
                values = evaluator.many([p for _, p in kids], frac)  # one batch per stage
                if len(values) < len(kids):
                    raise BudgetSpent(f"{evaluator.spent:.2f} of {evaluator.budget} spent")
                scored = [(v, g, p) for v, (g, p) in zip(values, kids, strict=True)]
                scored.sort(key=lambda x: -x[0])
                last = s == len(stages) - 1
                kids = [(g, p) for _, g, p in scored[: 1 if last else max(1, len(scored) // 2)]]
                if last and scored[0][0] > best:
                    best, parent, best_plan = scored[0][0], scored[0][1], scored[0][2]
                    history.append((evaluator.spent, best))
    except BudgetSpent:
        pass
    return SearchResult(best_plan, best, start_val, evaluator.spend(), history)
