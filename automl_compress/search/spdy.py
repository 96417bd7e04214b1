"""SPDY: the DP with per-layer coefficients searched on the true metric.

After Frantar & Alistarh, "SPDY: Accurate Pruning with Speedup Guarantees" (ICML 2022);
docs/objectives.md, "Searches". Every coefficient vector ``m ∈ R_{>0}^L`` gives a budget-feasible
plan: the DP over layers minimising ``Σ_l m_l · E_l`` (E_l the objective-weighted layer error),
realised by the exact within-layer knapsack. The search is over ``u = log10 m ∈ [−1, 1]^L``:

1. ``u = 0`` (the calibrated DP plan itself): the warm start, scored first;
2. ``inits`` random vectors ``u ~ U[−1, 1]^L``;
3. local search from the best: resample ``k`` coordinates uniformly in [−1, 1], keep the result
   if it scores higher; ``k`` starts at ``ceil(L / 10)`` and drops by one after every
   ``ROUND`` scored candidates without an improvement, down to 1.

Coefficient vectors that give an already-scored plan cost no evaluation (the evaluator's cache);
every ``ROUND`` of them in a row widen ``k`` by one, and ``MAX_REPEATS`` in a row end the search
(the DP has no new plan near the best one).

Batches (:meth:`~automl_compress.search.evaluator.Evaluator.many`, in parallel on a Ray executor):
the ``inits`` random vectors are scored as one batch, and the local search draws ``batch`` new
candidates from the same best vector before scoring them together, then takes them in order as
the one-by-one search would. ``batch=1`` is the sequential search; the result depends on
``batch``, never on the executor.

The result carries the best vector ``u`` (``SearchResult.coefficients``): :func:`coefficient_plan`
gives its plan at any budget without a new search (docs/benchmarks.md §3 measures how far such a
re-plan carries).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from automl_compress.config import CostConfig
from automl_compress.database.allocate import Candidates, allocate_dp, dp_candidates
from automl_compress.database.tables import LayerTable
from automl_compress.plan import CompressionPlan
from automl_compress.search.evaluator import BudgetSpent, Evaluator
from automl_compress.search.result import SearchResult

ROUND = 8
MAX_REPEATS = 200  # consecutive candidates whose plan was already scored: the search is done


def coefficient_plan(
    tables: Sequence[LayerTable], budget_bits: float, u: Sequence[float],
    cost: CostConfig | None = None, candidates: Candidates | None = None,
    memo: dict | None = None,
) -> CompressionPlan:
    """The plan of log10 layer coefficients ``u`` at ``budget_bits``.

    The DP over layers minimising ``Σ_l 10^u_l · E_l`` within the budget; ``u = 0`` is the
    calibrated DP plan.
    """
    p = allocate_dp(tables, budget_bits, cost, layer_weights=10.0 ** np.asarray(u, dtype=float),
                    candidates=candidates, memo=memo)
    return CompressionPlan(p.layers, meta={"method": "spdy", "budget_bits": float(budget_bits)})


def spdy_search(
    tables: Sequence[LayerTable], budget_bits: float, evaluator: Evaluator,
    cost: CostConfig | None = None, inits: int = 8, seed: int = 0,
    candidates: Candidates | None = None, batch: int = 1,
) -> SearchResult:
    """SPDY coefficient search until the evaluator's budget is spent.

    Args:
        tables: the objective-weighted layer tables (forward order).
        budget_bits: the budget in average bits per compressible weight.
        evaluator: the counting validation scorer (its budget ends the search).
        cost: size accounting.
        inits: random coefficient vectors before the local search.
        seed: the RNG's seed.
        candidates: :func:`~automl_compress.database.allocate.dp_candidates` of the tables.
        batch: local-search candidates drawn from one best vector and scored together.

    Returns:
        The best plan, never worse than the calibrated DP plan on the validation split, and its
        coefficients ``u``.
    """
    tables = list(tables)
    cands = dp_candidates(tables, cost) if candidates is None else candidates
    L = len(tables)
    rng = np.random.default_rng(seed)
    memo: dict = {}

    def plan_of(u: np.ndarray) -> CompressionPlan:
        return coefficient_plan(tables, budget_bits, u, cost, cands, memo)

    best_u = np.zeros(L)
    best_plan = plan_of(best_u)
    best = start_val = evaluator(best_plan, 1.0)
    history = [(evaluator.spent, best)]

    def consider(trial: list[tuple[np.ndarray, CompressionPlan]]) -> list[bool]:
        """Score the candidates as one batch and take them in order; whether each improved.

        Raises BudgetSpent after the ones that fit when the budget runs out.
        """
        nonlocal best, best_u, best_plan
        values = evaluator.many([p for _, p in trial], 1.0)
        improved = []
        for (u, p), v, spent in zip(trial, values, evaluator.spent_after, strict=False):
            improved.append(v > best)
            if v > best:
                best, best_u, best_plan = v, u, p
                history.append((spent, best))
        if len(values) < len(trial):
            raise BudgetSpent(f"{evaluator.spent:.2f} of {evaluator.budget} evaluations spent")
        return improved

    k, misses, repeats = max(1, math.ceil(L / 10)), 0, 0
    try:
        inits_u = [rng.uniform(-1.0, 1.0, L) for _ in range(inits)]
        consider([(u, plan_of(u)) for u in inits_u])
        while repeats < MAX_REPEATS:
            trial: list[tuple[np.ndarray, CompressionPlan]] = []
            while len(trial) < batch and repeats < MAX_REPEATS:
                u = best_u.copy()
                idx = rng.choice(L, size=min(k, L), replace=False)
                u[idx] = rng.uniform(-1.0, 1.0, len(idx))
                p = plan_of(u)
                if evaluator.known(p) is not None or any(p.key() == q.key() for _, q in trial):
                    # the DP gave a plan already scored: perturb more coordinates next time
                    repeats += 1
                    if repeats % ROUND == 0 and k < L:
                        k += 1
                    continue
                repeats = 0
                trial.append((u, p))
            if not trial:
                break
            for improved in consider(trial):
                if improved:
                    misses = 0
                else:
                    misses += 1
                    if misses >= ROUND and k > 1:
                        k, misses = k - 1, 0
    except BudgetSpent:
        pass
    return SearchResult(best_plan, best, start_val, evaluator.spend(), history,
                        tuple(float(x) for x in best_u))
