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


def _scan_dp(e, u, cap):
    """The row DP by its definition: for each total cost t, the options in order, a later one
    taken only when strictly better (ties and infeasible costs keep the first, option 0)."""
    g = np.full(cap + 1, np.inf)
    g[0] = 0.0
    picks = []
    for r in range(len(e)):
        new, pick = np.full(cap + 1, np.inf), np.zeros(cap + 1, dtype=np.int64)
        for t in range(cap + 1):
            for j in range(len(u)):
                if u[j] <= t and g[t - u[j]] + e[r, j] < new[t]:
                    new[t], pick[t] = g[t - u[j]] + e[r, j], j
        picks.append(pick.tolist())
        g = new
    return g.tolist(), picks


def test_row_dp_keeps_the_first_best_option_as_a_scan_over_the_options_does():
    from automl_compress.database.knapsack import _dp_rows

    rng = np.random.default_rng(7)
    e = rng.choice([0.0, 0.25, 0.5, 1.0], size=(8, 5))  # many exact ties
    u = np.array([0, 2, 3, 3, 7])  # two options with the same cost; one past small caps
    for cap in (5, 40):
        f, choice = _dp_rows(e, u, cap)
        want_f, want_choice = _scan_dp(e, u, cap)
        assert f.tolist() == want_f
        assert choice.tolist() == want_choice


def test_row_dp_equals_the_scan_on_random_costs_caps_and_infinite_errors():
    # the DP works on the window of costs that can be finite after each row: costs whose
    # cheapest option is not free, caps below and above what the rows reach, options past the
    # cap, infeasible (infinite) errors, no row at all
    from automl_compress.database.knapsack import _dp_rows

    rng = np.random.default_rng(11)
    for _ in range(300):
        rows, n_opt = int(rng.integers(0, 6)), int(rng.integers(1, 5))
        u = rng.integers(0, 7, n_opt)
        cap = int(rng.integers(0, 30))
        e = rng.choice([0.0, 0.5, 1.0, np.inf], size=(rows, n_opt), p=[0.3, 0.3, 0.3, 0.1])
        f, choice = _dp_rows(e, u, cap)
        want_f, want_choice = _scan_dp(e, u, cap)
        assert f.tolist() == want_f, (rows, u.tolist(), cap)
        assert choice.tolist() == want_choice, (rows, u.tolist(), cap)
        f_alone, none = _dp_rows(e, u, cap, choices=False)
        assert none is None and f_alone.tolist() == want_f, (rows, u.tolist(), cap)


def test_row_dp_without_choices_gives_the_same_least_errors_bit_for_bit():
    # the values-only DP takes a running minimum where the full one scans for strict
    # improvements: the same sums, so the same floats, on errors of every magnitude
    from automl_compress.database.knapsack import _dp_rows

    rng = np.random.default_rng(12)
    for _ in range(20):
        rows, n_opt = int(rng.integers(1, 30)), int(rng.integers(2, 7))
        u = np.concatenate([[0], np.sort(rng.integers(1, 40, n_opt - 1))])
        e = 10.0 ** rng.uniform(-8, 3, size=(rows, n_opt))
        cap = int(rng.integers(0, rows * int(u.max()) + 2))
        f, _ = _dp_rows(e, u, cap)
        f_alone, _ = _dp_rows(e, u, cap, choices=False)
        assert np.array_equal(f, f_alone)


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


@pytest.mark.parametrize("runs", [True, False])
@pytest.mark.parametrize("max_cells", [10**9, 2_000, 0])
def test_kept_tables_answer_every_budget_as_a_fresh_knapsack(max_cells, runs, monkeypatch):
    # one kept DP table per pattern answers later budgets (up and down, past its width too)
    # with exactly the assignment a fresh knapsack gives; tables past the byte cap in int8 cells
    # are kept as runs when those fit, else not kept; past max_cells the hull greedy's steps are
    # kept instead, with the same assignments
    import automl_compress.database.knapsack as ks

    monkeypatch.setattr(ks, "KEPT_TABLE_BYTES", 2_000)
    t = random_table(rows=12, cols=32, seed=5)
    # a plain dict keeps with the defaults; KeptTables sets its own limits (the envs': no runs)
    kept: dict = {} if runs else ks.KeptTables(2_000, runs=False)
    rng = np.random.default_rng(0)
    for pattern in ("dense", "50%"):
        c = t.option_bits()[t.patterns.index(pattern)]
        lo, hi = 12 * c.min(), 12 * c.max()
        for budget in rng.uniform(lo, hi, 25):
            fresh = knapsack_layer(t, pattern, budget, max_cells=max_cells)
            again = knapsack_layer(t, pattern, budget, max_cells=max_cells, tables=kept)
            assert again.tolist() == fresh.tolist()
    dps = {k: v for k, v in kept.items() if isinstance(k, str)}
    assert all(dp.nbytes <= 2_000 for dp in dps.values())
    assert bool(dps) == (max_cells > 0)
    if max_cells == 10**9:  # the widest tables fit only as runs
        assert any(isinstance(dp.choice, ks.ChoiceRuns) for dp in dps.values()) == runs
    assert (("hull", "dense") in kept) == (max_cells == 0)
    # the curve's own DP, kept by layer_curve, answers budgets the same way
    small = random_table(rows=6, cols=16, seed=6)
    from_curve: dict = {}
    layer_curve(small, "dense", max_cells=max_cells, tables=from_curve)
    assert ("dense" in from_curve) == (max_cells > 0)
    c = small.option_bits()[0]
    for budget in rng.uniform(6 * c.min(), 6 * c.max(), 25):
        fresh = knapsack_layer(small, "dense", budget, max_cells=max_cells)
        again = knapsack_layer(small, "dense", budget, max_cells=max_cells, tables=from_curve)
        assert again.tolist() == fresh.tolist()


def test_curves_without_choices_keep_nothing_and_give_the_same_curve_and_plans():
    # the environments' tables (curve_choices=False): the curve is the one a keeping or a
    # dict-less call gives, no DP is kept by it, and later budgets build their own tables
    import automl_compress.database.knapsack as ks

    t = random_table(rows=10, cols=32, seed=8)
    rng = np.random.default_rng(1)
    for pattern in ("dense", "50%"):
        keeping: dict = {}
        lazy = ks.KeptTables(curve_choices=False)
        want = layer_curve(t, pattern, tables=keeping)
        for got in (layer_curve(t, pattern, tables=lazy), layer_curve(t, pattern)):
            assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()
        assert pattern in keeping and pattern not in lazy
        c = t.option_bits()[t.patterns.index(pattern)]
        for budget in rng.uniform(10 * c.min(), 10 * c.max(), 10):
            fresh = knapsack_layer(t, pattern, budget)
            assert knapsack_layer(t, pattern, budget, tables=lazy).tolist() == fresh.tolist()
            assert knapsack_layer(t, pattern, budget, tables=keeping).tolist() == fresh.tolist()
        assert pattern in lazy


@pytest.mark.parametrize("width", [300, 70_000])
def test_choice_runs_read_back_every_cell(width):
    # the run-length form of a choice table gives every cell's value (uint16 starts up to 65,536
    # costs, int64 past them)
    from automl_compress.database.knapsack import ChoiceRuns

    rng = np.random.default_rng(width)
    choice = np.repeat(rng.integers(0, 5, size=(3, width // 10 + 1)), 10, axis=1)[:, :width]
    choice[1] = 2  # a row of one run
    choice = choice.astype(np.int8)
    runs = ChoiceRuns.of(choice)
    assert runs.shape == (3,) and runs.nbytes < choice.nbytes
    for r in range(3):
        for t in [0, width - 1, *rng.integers(0, width, 200).tolist()]:
            assert runs[r, t] == choice[r, t]


def test_knapsack_infeasible_budget_names_the_minimum():
    t = random_table(rows=4, cols=16, bits=(2, 4, 8), seed=2)
    minimum = 4 * t.option_bits()[0].min()
    with pytest.raises(InfeasibleBudgetError) as ei:
        knapsack_layer(t, "dense", minimum - 1)
    assert ei.value.minimum == pytest.approx(minimum / t.info.numel)
    assert "smallest feasible budget" in str(ei.value)


def test_pareto_filter_equals_the_running_best_scan():
    from automl_compress.database.knapsack import _pareto

    def scan(errs):  # keep i iff it beats the best kept so far by more than 1e-15 relative
        keep, best = [], np.inf
        for v in errs:
            ok = not np.isfinite(best) or v < best - 1e-15 * max(abs(best), 1.0)
            keep.append(ok)
            best = v if ok else best
        return keep

    # a point inside the tolerance is dropped and must not tighten the bar for the next one
    within = [0.0, -0.5e-15, -1.2e-15]
    assert _pareto(np.array(within)).tolist() == scan(within) == [True, False, True]
    rng = np.random.default_rng(1)
    for _ in range(500):
        n = int(rng.integers(1, 30))
        errs = np.cumsum(rng.normal(-1, 1, n))
        if rng.random() < 0.4:  # a point within the tolerance of the best so far
            i = int(rng.integers(1, n)) if n > 1 else 0
            errs[i] = errs[:i].min() * (1 - 1e-16) if i else errs[i]
        if rng.random() < 0.3:
            errs = np.round(errs)  # exact ties
        assert _pareto(errs).tolist() == scan(errs)
