"""The in-layer knapsack over synthetic layer tables: exactness, the hull mode, infeasibility."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from _random_tables import random_table

from automl_compress.database.knapsack import knapsack_layer, layer_curve
from automl_compress.errors import InfeasibleBudgetError


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
