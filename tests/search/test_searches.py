"""evo and spdy: within budget, never worse than their warm start on the validation split,
counted evaluations; the evaluator's accounting; the budget-neutral mutation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _compress_task import tiny_config

from automl_compress import pipeline, selection
from automl_compress.cli import main
from automl_compress.database.allocate import allocate_dp, plan_avg_bits
from automl_compress.plan import CompressionPlan, LayerPlan
from automl_compress.search import BudgetSpent, Evaluator, evo_search, spdy_search
from automl_compress.search.evo import _Ranges, genome_of, mutate
from automl_compress.search.spdy import coefficient_plan

BUDGET = 3.0


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cfg = tiny_config("task.name=_compress_task:make_task", "alloc.objective=normalized")
    return pipeline.prepare(cfg, tmp_path_factory.mktemp("search"), progress=False)


@pytest.mark.parametrize("method", ["evo", "spdy"])
def test_search_within_budget_and_never_worse_than_its_start(prepared, method):
    ev = selection.evaluator(prepared, budget=12)
    tables, cost = prepared.tables, prepared.cfg.cost
    start = allocate_dp(tables, BUDGET, cost)
    if method == "evo":
        res = evo_search(tables, BUDGET, start, ev, cost, offspring=4, stages=(0.5, 1.0))
    else:
        res = spdy_search(tables, BUDGET, ev, cost, inits=2)
    assert plan_avg_bits(res.plan, tables, cost) <= BUDGET + 1e-9
    start_val = pipeline.validate_plan(prepared, start)
    assert res.start_val == pytest.approx(start_val)
    assert res.metric_val >= start_val
    assert res.metric_val == pytest.approx(pipeline.validate_plan(prepared, res.plan))
    assert res.spend.evaluations <= 12 + 1e-9 and res.spend.calls >= 1
    assert [v for _, v in res.history] == sorted(v for _, v in res.history)


def test_evaluator_counts_caches_and_refuses_past_its_budget():
    calls = []

    def score(plan, fraction):
        calls.append(fraction)
        return float(len(calls))

    ev = Evaluator(score, lambda f: int(round(100 * f)), budget=1.5)
    a = CompressionPlan({}, meta={"x": 1})
    assert ev(a, 0.5) == 1.0 and ev(a, 0.5) == 1.0  # cached: not counted again
    assert ev.spent == pytest.approx(0.5) and ev.calls == 1 and ev.samples == 50
    assert ev(a, 1.0) == 2.0 and ev.spent == pytest.approx(1.5)
    assert not ev.affordable(0.25)
    with pytest.raises(BudgetSpent):
        ev(CompressionPlan({"l": LayerPlan("dense", (2,))}), 0.25)
    assert ev.spent == pytest.approx(1.5) and len(calls) == 2


def test_mutations_keep_the_budget_and_every_layer_in_range(prepared):
    tables, cost = prepared.tables, prepared.cfg.cost
    r = _Ranges(tables, cost)
    total = BUDGET * float(r.numel.sum())
    g = genome_of(allocate_dp(tables, BUDGET, cost), tables, cost, total)
    rng = np.random.default_rng(0)
    moved = 0
    for _ in range(300):
        g2 = mutate(g, r, rng)
        assert sum(g2.budgets) + g2.pool == pytest.approx(sum(g.budgets) + g.pool, rel=1e-9)
        for i, (p, b) in enumerate(zip(g2.patterns, g2.budgets, strict=True)):
            assert r.lo[i][p] - 1e-6 <= b <= r.hi[i][p] + 1e-6
        moved += g2 != g
        g = g2
    assert moved > 100


def test_correction_choice_is_made_on_validation_and_counted(prepared):
    plan = allocate_dp(prepared.tables, BUDGET, prepared.cfg.cost)
    saved, choices = prepared.cfg, selection.correction_choices(prepared)
    try:
        out = selection.calibrate(prepared, "dp", BUDGET)["corrections"]
        scores = out["scores"]
        assert out["chosen_on"] == "validation" and out["evaluations"] == len(scores) > 1
        key = f"{'bias' if out['bias_correction'] else 'nobias'}+{out['bn_reestimate']}"
        assert scores[key] == max(scores.values())
        assert scores == pytest.approx({k: pipeline.validate_plan(prepared, plan, 1.0, c)
                                        for k, c in zip(scores, choices, strict=True)})
        assert prepared.cfg.eval.bn_reestimate == out["bn_reestimate"]
    finally:
        prepared.cfg = saved


@pytest.mark.parametrize("method", ["evo", "spdy"])
def test_cli_compress_search_writes_validation_and_evaluations(tmp_path, capsys, method):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("task:\n  name: _compress_task:make_task\nmenu:\n  bits: [0, 2, 4, 8]\n"
                        "  patterns: [dense, '2:4']\nsolver:\n  quant: gptq\n")
    out = tmp_path / "run"
    code = main(["compress", "--config", str(cfg_file), "--method", method, "--budget-bits", "3",
                 "--evaluations", "16", "--out", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == method and 0 < res["evaluations"] <= 16
    assert res["metric_val"] >= res["start_val"]
    assert res["corrections"]["chosen_on"] == "validation"
    assert "val" in capsys.readouterr().out
    # spdy's coefficients: one log10 value per layer, in [-1, 1]; evo has none
    coefs = res.get("coefficients")
    if method == "spdy":
        assert len(coefs) == len(res["layers"]) and all(-1 <= c <= 1 for c in coefs)
    else:
        assert coefs is None


def test_evaluator_many_spends_exactly_what_one_by_one_scoring_spends():
    def score(plan, fraction):
        return float(plan.layers["l"].row_bits[0]) + fraction

    plans = [CompressionPlan({"l": LayerPlan("dense", (b,))}) for b in (2, 3, 2, 4, 5, 6)]
    batches = []

    def many(ps, fraction):
        batches.append(len(ps))
        return [score(p, fraction) for p in ps]

    one = Evaluator(score, lambda f: int(round(100 * f)), budget=2.0)
    one(plans[1], 0.5)  # already cached: free in both
    got = []
    with pytest.raises(BudgetSpent):
        for p in plans:
            got.append(one(p, 0.5))
    batch = Evaluator(score, lambda f: int(round(100 * f)), budget=2.0, score_many=many)
    batch(plans[1], 0.5)
    values = batch.many(plans, 0.5)
    assert values == got and len(values) == 5  # stops where the loop raised
    assert batches == [3]  # the three new plans that fit, scored together
    assert (batch.calls, batch.samples, batch.cache) == (one.calls, one.samples, one.cache)
    assert batch.spent_after == [1.0, 1.0, 1.0, 1.5, 2.0]


def test_spdy_coefficients_replan_to_its_best_plan_and_stay_in_budget_elsewhere(prepared):
    tables, cost = prepared.tables, prepared.cfg.cost
    dp = allocate_dp(tables, BUDGET, cost)
    first = tables[0].info.name

    def score(plan, fraction):  # anything but the DP's choice: more bits on the first layer
        return float(np.mean(plan.layers[first].row_bits))

    ev = Evaluator(score, lambda f: int(round(100 * f)), budget=16)
    res = spdy_search(tables, BUDGET, ev, cost, inits=4, seed=1)
    assert res.plan.key() != CompressionPlan(dp.layers).key(), "the search must move for this test"
    assert len(res.coefficients) == len(tables)
    assert coefficient_plan(tables, BUDGET, res.coefficients, cost).key() == res.plan.key()
    assert coefficient_plan(tables, BUDGET, [0.0] * len(tables), cost).key() == \
        CompressionPlan(dp.layers).key()
    for b in (BUDGET - 0.5, BUDGET + 1.0):
        assert plan_avg_bits(coefficient_plan(tables, b, res.coefficients, cost), tables,
                             cost) <= b + 1e-9
