"""Allocators over synthetic layer tables: exactness, budgets, infeasibility."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from automl_compress.database.allocate import (
    allocate_dp,
    allocate_uniform,
    knapsack_layer,
    layer_curve,
    min_feasible_avg_bits,
    plan_avg_bits,
    plan_bits,
    plan_error,
)
from automl_compress.database.tables import LayerInfo, LayerTable
from automl_compress.errors import InfeasibleBudgetError
from automl_compress.plan import CompressionPlan


def random_table(rows, cols, bits=(0, 2, 3, 4, 8), patterns=("dense", "50%"), seed=0, name="l"):
    """Errors shaped like real ones: decreasing in bits, sparse patterns worse, 0 bits = energy."""
    rng = np.random.default_rng(seed)
    energy = rng.gamma(2.0, 1.0, size=rows) * cols
    sens = rng.lognormal(0.0, 1.0, size=rows)
    errs = np.zeros((rows, len(patterns), len(bits)))
    for pi in range(len(patterns)):
        for bi, b in enumerate(bits):
            if b == 0:
                errs[:, pi, bi] = energy
            else:
                errs[:, pi, bi] = np.minimum(energy, sens * 4.0 ** (-b) * cols * (1 + 2 * pi))
    info = LayerInfo(name=name, kind="linear", rows=rows, cols=cols)
    return LayerTable(info, tuple(bits), tuple(patterns), errs)


def brute_force(table, pattern, budget):
    c = table.option_bits()[table.patterns.index(pattern)]
    e = table.errors[:, table.patterns.index(pattern), :]
    best = (np.inf, None)
    for combo in itertools.product(range(len(table.bits)), repeat=table.info.rows):
        cost = c[list(combo)].sum()
        if cost <= budget + 1e-9:
            err = e[np.arange(table.info.rows), list(combo)].sum()
            if err < best[0]:
                best = (err, combo)
    return best[0]


@pytest.mark.parametrize("pattern", ["dense", "50%"])
def test_knapsack_layer_matches_brute_force(pattern):
    t = random_table(rows=5, cols=16, seed=3)
    c = t.option_bits()[t.patterns.index(pattern)]
    for frac in (0.0, 0.2, 0.45, 0.7, 1.0):
        budget = frac * 5 * c.max()
        rb = knapsack_layer(t, pattern, budget)
        used = c[np.searchsorted(t.bits, rb)].sum()
        assert used <= budget + 1e-9
        assert t.error_of(pattern, rb) == pytest.approx(brute_force(t, pattern, budget), rel=1e-12)


def test_hull_mode_stays_within_budget_and_is_exact_at_breakpoints():
    t = random_table(rows=40, cols=64, seed=1)
    costs, errs = layer_curve(t, "dense", max_cells=0)  # hull breakpoints
    assert np.all(np.diff(costs) > 0) and np.all(np.diff(errs) < 0)
    c = t.option_bits()[0]
    for budget, err in zip(costs[::7], errs[::7], strict=True):
        hull = knapsack_layer(t, "dense", budget, max_cells=0)
        exact = knapsack_layer(t, "dense", budget)
        assert c[np.searchsorted(t.bits, hull)].sum() <= budget + 1e-9
        # a hull breakpoint is a Lagrangian optimum, so the exact DP cannot beat it
        assert t.error_of("dense", hull) == pytest.approx(t.error_of("dense", exact), rel=1e-9)
        assert t.error_of("dense", hull) <= err * (1 + 1e-9)
    # between breakpoints the greedy is feasible and no better than exact
    mid = 0.5 * (costs[10] + costs[11])
    hull = knapsack_layer(t, "dense", mid, max_cells=0)
    assert c[np.searchsorted(t.bits, hull)].sum() <= mid
    assert t.error_of("dense", hull) >= t.error_of("dense", knapsack_layer(t, "dense", mid)) - 1e-9


def test_knapsack_infeasible_budget_names_the_minimum():
    t = random_table(rows=4, cols=16, bits=(2, 4, 8), seed=2)
    minimum = 4 * t.option_bits()[0].min()
    with pytest.raises(InfeasibleBudgetError) as ei:
        knapsack_layer(t, "dense", minimum - 1)
    assert ei.value.minimum == pytest.approx(minimum / t.info.numel)
    assert "smallest feasible budget" in str(ei.value)


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


def test_plan_bops_counts_bits_sparsity_and_removed_rows():
    from automl_compress.database.allocate import plan_bops
    from automl_compress.plan import LayerPlan

    info = LayerInfo(name="l", kind="linear", rows=4, cols=16, macs=4 * 16)
    t = LayerTable(info, (0, 4, 8), ("dense", "50%"), np.ones((4, 2, 3)))
    dense8 = CompressionPlan({"l": LayerPlan("dense", (8, 8, 8, 8))})
    assert plan_bops(dense8, [t]) == 64 * 8 * 8
    mixed = CompressionPlan({"l": LayerPlan("50%", (0, 4, 8, 8))})
    assert plan_bops(mixed, [t]) == 16 * 0.5 * (4 + 8 + 8) * 8
