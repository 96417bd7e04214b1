"""selection.calibrate: the objective (alloc.objective=auto) and the statistics corrections chosen
together on the validation split, every scored pair counted, nothing scored twice."""

from __future__ import annotations

import dataclasses

import pytest
from _compress_task import tiny_config

from automl_compress import pipeline, selection
from automl_compress.config import load_config
from automl_compress.errors import ConfigError

BUDGET = 3.0


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cfg = tiny_config("task.name=_compress_task:make_task", "alloc.objective=auto",
                      "alloc.auto_objectives=[raw, normalized, fisher]")
    return pipeline.prepare(cfg, tmp_path_factory.mktemp("calibrate"), progress=False)


@pytest.fixture()
def fresh(prepared):
    """``prepared`` with its configured objective and corrections restored after the test."""
    saved_cfg, saved_obj = prepared.cfg, prepared.objective
    yield prepared
    prepared.cfg = saved_cfg
    prepared.set_objective(saved_obj)


def _brute_force(prepared, names, budget):
    """Every (objective, corrections) pair's validation score, computed directly."""
    scores, plans = {}, set()
    for name in names:
        prepared.set_objective(pipeline.load_objective(prepared, name, progress=False))
        plan = pipeline.allocate(prepared, "dp", budget)
        for c in selection.correction_choices(prepared):
            scores[(name, c)] = pipeline.validate_plan(prepared, plan, 1.0, c)
            plans.add((plan.key(), c))
    return scores, len(plans)


def test_auto_chooses_the_best_objective_and_corrections_on_validation(fresh):
    names = fresh.cfg.alloc.auto_objectives
    scores, distinct = _brute_force(fresh, names, BUDGET)
    out = selection.calibrate(fresh, "dp", BUDGET)
    best = max(scores.values())
    chosen = (out["objective"]["name"],
              next(c for c in selection.correction_choices(fresh)
                   if (c.bias_correction, c.bn_reestimate)
                   == (out["corrections"]["bias_correction"],
                       out["corrections"]["bn_reestimate"])))
    assert scores[chosen] == pytest.approx(best)
    assert out["objective"]["chosen_on"] == "validation"
    assert out["objective"]["scores"] == pytest.approx(
        {n: max(v for (m, _), v in scores.items() if m == n) for n in names})
    assert out["evaluations"] == distinct == out["corrections"]["evaluations"]
    assert str(fresh.objective.name) == out["objective"]["name"]
    assert fresh.cfg.eval.bn_reestimate == out["corrections"]["bn_reestimate"]
    assert fresh.cfg.eval.bias_correction == out["corrections"]["bias_correction"]


def test_objectives_with_the_same_plan_are_scored_once(fresh):
    top = float(max(fresh.cfg.menu.bits)) + 2  # room for the widest option on every row
    names = fresh.cfg.alloc.auto_objectives
    plans = set()
    for name in names:
        fresh.set_objective(pipeline.load_objective(fresh, name, progress=False))
        plans.add(pipeline.allocate(fresh, "dp", top).key())
    assert len(plans) < len(names)  # raw and normalized agree here (fisher may drop dead rows)
    out = selection.calibrate(fresh, "dp", top)
    assert out["evaluations"] == len(plans) * len(selection.correction_choices(fresh))


def test_fixed_settings_spend_no_evaluations(fresh):
    fresh.cfg = dataclasses.replace(
        fresh.cfg, alloc=dataclasses.replace(fresh.cfg.alloc, objective="fisher"),
        eval=dataclasses.replace(fresh.cfg.eval, corrections="fixed"))
    fresh.set_objective(pipeline.load_objective(fresh, progress=False))
    out = selection.calibrate(fresh, "dp", BUDGET)
    assert out["evaluations"] == 0
    assert out["objective"] == {"name": "fisher", "chosen_on": "config"}
    assert out["corrections"]["chosen_on"] == "config"


def test_auto_objective_is_not_chosen_for_uniform(fresh):
    loaded = fresh.objective.name
    out = selection.calibrate(fresh, "uniform", BUDGET)
    assert out["objective"]["chosen_on"] == "config" and fresh.objective.name == loaded
    assert out["evaluations"] == len(selection.correction_choices(fresh))


def test_compress_dp_counts_the_choice_in_its_evaluations(fresh):
    plan, sel = selection.compress(fresh, "dp", BUDGET)
    assert sel["evaluations"] == sel["metric_calls"] > len(selection.correction_choices(fresh))
    assert sel["objective_choice"]["name"] == str(fresh.objective.name)
    assert plan.key() == pipeline.allocate(fresh, "dp", BUDGET).key()


def test_auto_skips_an_objective_the_model_cannot_give_with_a_warning(tmp_path):
    cfg = tiny_config("task.name=_compress_task:make_no_grad_task", "alloc.objective=auto")
    prepared = pipeline.prepare(cfg, tmp_path, progress=False)
    with pytest.warns(UserWarning, match="'fisher' skipped.*without gradients"):
        out = selection.calibrate(prepared, "dp", BUDGET)
    assert out["objective"]["name"] == "normalized"
    assert "without gradients" in out["objective"]["skipped"]["fisher"]
    assert out["evaluations"] == len(selection.correction_choices(prepared))


@pytest.mark.parametrize("override", ["alloc.objective=best", "alloc.auto_objectives=[]",
                                      "alloc.auto_objectives=[auto]"])
def test_bad_objective_settings_are_named(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])
