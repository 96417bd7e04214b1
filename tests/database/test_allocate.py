"""The allocators over layers (DP, uniform) over synthetic layer tables: budgets, optimality,
infeasibility; plan accounting."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from _random_tables import random_table

from automl_compress.database.allocate import (
    _can_win,
    allocate_dp,
    allocate_uniform,
    dp_candidates,
    min_feasible_avg_bits,
    plan_avg_bits,
    plan_bits,
    plan_error,
    realise,
)
from automl_compress.errors import InfeasibleBudgetError
from automl_compress.plan import CompressionPlan


def tables_set(bits=(0, 2, 3, 4, 8)):
    return [
        random_table(12, 32, bits=bits, seed=10, name="a"),
        random_table(6, 96, bits=bits, seed=11, name="b"),
        random_table(20, 16, bits=bits, seed=12, name="c", patterns=("dense",)),
    ]


@pytest.mark.parametrize("budget", [8.0, 4.0, 3.0, 2.5, 1.0])
def test_dp_within_budget_and_beats_uniform(budget):
    tables = tables_set()
    plan = allocate_dp(tables, budget)
    assert set(plan.layers) == {"a", "b", "c"}
    assert plan_avg_bits(plan, tables) <= budget + 1e-9
    try:
        uni = allocate_uniform(tables, budget)
    except InfeasibleBudgetError:
        return
    assert plan_avg_bits(uni, tables) <= budget + 1e-9
    assert plan_error(plan, tables) <= plan_error(uni, tables) * (1 + 1e-9)


def test_dp_error_falls_with_budget_and_is_near_optimal():
    tables = [random_table(3, 8, bits=(0, 2, 4, 8), seed=s, name=f"l{s}",
                           patterns=("dense",)) for s in range(2)]
    errs = [plan_error(allocate_dp(tables, b), tables) for b in (1.0, 2.0, 3.0, 5.0, 9.0)]
    assert all(x >= y - 1e-12 for x, y in zip(errs, errs[1:], strict=False))
    # brute force over all 4^6 assignments; the DP loses at most the bucket rounding
    budget = 3.0
    total = budget * sum(t.info.numel for t in tables)
    slack = len(tables) * total / 4000
    c = tables[0].option_bits()[0]
    best = np.inf
    for combo in itertools.product(range(4), repeat=6):
        if c[list(combo)].sum() <= total - slack:
            best = min(best, sum(tables[i // 3].errors[i % 3, 0, combo[i]] for i in range(6)))
    assert plan_error(allocate_dp(tables, budget), tables) <= best + 1e-12


def test_layer_weights_move_bits_to_the_weighted_layer():
    tables = tables_set()
    base = allocate_dp(tables, 3.0)

    def bits_of(plan, k):
        name = tables[k].info.name
        return plan_bits(CompressionPlan({name: plan.layers[name]}), [tables[k]])

    def err_of(plan, k):
        lp = plan.layers[tables[k].info.name]
        return tables[k].error_of(lp.pattern, lp.row_bits)

    for k in range(3):
        w = [1.0, 1.0, 1.0]
        w[k] = 1000.0
        heavy = allocate_dp(tables, 3.0, layer_weights=w)
        light = allocate_dp(tables, 3.0, layer_weights=[1.0 / x for x in w])
        # strictly: the weighted layer gains bits and loses error, the unweighted one the reverse
        assert bits_of(heavy, k) > bits_of(base, k) > bits_of(light, k)
        assert err_of(heavy, k) < err_of(base, k) < err_of(light, k)
        assert plan_avg_bits(heavy, tables) <= 3.0 + 1e-9


def _dp_picks_over_every_candidate(cands, budget_units, units_of, weights):
    """The DP's forward pass and backtrack over *all* candidates, one t at a time (reference)."""
    T = budget_units
    F = [0.0] * (T + 1)
    choices = []
    for li, pts in enumerate(cands):
        G, arg = [], []
        for t in range(T + 1):
            best, k_best = np.inf, -1
            for k, (_, ci, ei) in enumerate(pts):
                u = units_of(ci)
                if u <= t and F[t - u] + weights[li] * ei < best:  # strict: the first minimum
                    best, k_best = F[t - u] + weights[li] * ei, k
            G.append(best)
            arg.append(k_best)
        F = G
        choices.append(arg)
    picks, t = [], T
    for li in range(len(cands) - 1, -1, -1):
        k = choices[li][t]
        picks.append(cands[li][k][:2])
        t -= units_of(cands[li][k][1])
    return picks[::-1]


@pytest.mark.parametrize("gather_cells", [0, 1 << 16])
@pytest.mark.parametrize("seed", range(6))
def test_dp_pruned_candidates_choose_exactly_as_every_candidate(seed, gather_cells, monkeypatch):
    # errors rounded to a coarse grid: many ties in cost and in error, and zero layer weights;
    # every step a shifted minimum per candidate (0), or one gathered table (every step fits)
    import automl_compress.database.allocate as al

    monkeypatch.setattr(al, "GATHER_CELLS", gather_cells)
    rng = np.random.default_rng(seed)
    tables = tables_set()
    for t in tables:
        t.errors[:] = np.round(t.errors / t.errors.max() * 6) / 2
    cands = dp_candidates(tables)
    weights = [float(x) for x in rng.choice([0.0, 0.5, 1.0, 3.0], size=len(tables))]
    resolution = 40
    budget = float(rng.uniform(1.0, 6.0))
    total = budget * sum(t.info.rows * t.info.cols for t in tables)
    delta = total / resolution

    def units_of(ci):
        return int(np.ceil(ci / delta - 1e-9)) if ci > 0 else 0

    want = _dp_picks_over_every_candidate(cands, resolution, units_of, weights)
    got = allocate_dp(tables, budget, layer_weights=weights, candidates=cands,
                      resolution=resolution)
    assert got.layers == realise(tables, want).layers


def test_can_win_drops_only_candidates_that_never_win():
    units = np.array([0, 1, 1, 2, 2, 3])
    cost = np.array([5.0, 4.0, 4.0, 4.0, 1.0, 1.0])
    # 2 ties 1 (same units, same cost, later), 3 is beaten by 1 (fewer units, same cost,
    # earlier), 5 by 4; 0, 1, 4 can each be a first minimum
    assert _can_win(units, cost).tolist() == [0, 1, 4]
    # a candidate that ties an earlier-sorted one but has the smaller index stays
    assert _can_win(np.array([1, 0]), np.array([2.0, 2.0])).tolist() == [0, 1]


def test_can_win_without_ties_is_the_staircase_of_a_brute_force_check():
    # continuous costs (no ties): j can win iff no candidate with units <= u_j is strictly cheaper
    rng = np.random.default_rng(3)
    for _ in range(20):
        units = rng.integers(0, 30, 60)
        cost = rng.random(60)
        brute = [j for j in range(60)
                 if not np.any((units <= units[j]) & (cost < cost[j]))]
        assert _can_win(units, cost).tolist() == brute


def test_infeasible_budget_states_the_smallest_feasible_one():
    tables = tables_set(bits=(2, 4, 8))
    minimum = min_feasible_avg_bits(tables)
    assert minimum > 2.0  # per-row scale/zero metadata on top of 2 bits
    with pytest.raises(InfeasibleBudgetError) as ei:
        allocate_dp(tables, minimum - 0.01)
    assert ei.value.minimum == pytest.approx(minimum)
    with pytest.raises(InfeasibleBudgetError):
        allocate_uniform(tables, minimum - 0.01)
    assert min_feasible_avg_bits(tables_set()) == 0.0


def test_plan_json_round_trip(tmp_path):
    tables = tables_set()
    plan = allocate_dp(tables, 3.0)
    plan.save(tmp_path / "plan.json")
    back = CompressionPlan.load(tmp_path / "plan.json")
    assert back.to_dict() == plan.to_dict()
    assert plan_error(back, tables) == plan_error(plan, tables)
