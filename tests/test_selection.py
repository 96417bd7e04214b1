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


def _on_calibration(fresh, objective):
    fresh.cfg = dataclasses.replace(
        fresh.cfg, alloc=dataclasses.replace(fresh.cfg.alloc, objective=objective),
        eval=dataclasses.replace(fresh.cfg.eval, corrections="calibration"))
    if objective != "auto":
        fresh.set_objective(pipeline.load_objective(fresh, progress=False))


def _fidelities(prepared, budget):
    plan = pipeline.allocate(prepared, "dp", budget)
    return {c: pipeline.calibration_fidelity(prepared, plan, c)
            for c in selection.correction_choices(prepared)}


def test_calibration_corrections_take_the_most_faithful_and_spend_no_evaluations(fresh):
    _on_calibration(fresh, "fisher")
    fids = _fidelities(fresh, BUDGET)
    assert len(set(fids.values())) > 1  # the choice matters here
    best = max(fids, key=fids.get)
    out = selection.calibrate(fresh, "dp", BUDGET)
    assert out["evaluations"] == 0 == out["corrections"]["evaluations"]
    assert out["corrections"]["chosen_on"] == "calibration"
    assert out["corrections"]["calibration_passes"] == len(fids)
    assert out["corrections"]["scores"] == pytest.approx(
        {selection._label(c): v for c, v in fids.items()})
    assert (fresh.cfg.eval.bias_correction, fresh.cfg.eval.bn_reestimate) == \
        (best.bias_correction, best.bn_reestimate)
    assert out["objective"] == {"name": "fisher", "chosen_on": "config"}


def test_calibration_fidelity_is_the_dense_outputs_fidelity_on_the_calibration_batches(fresh):
    from automl_compress.zoo.base import fidelity_metric

    t = fresh.task
    plan = pipeline.allocate(fresh, "dp", BUDGET)
    direct = fidelity_metric(t.model, t.forward, t.distance, list(t.calib))
    for c in selection.correction_choices(fresh):
        assert pipeline.calibration_fidelity(fresh, plan, c) == pytest.approx(
            direct(pipeline.stitched_model(fresh, plan, c)))
    assert pipeline.calibration_fidelity(fresh, plan) < direct(t.model) == pytest.approx(0.0,
                                                                                    abs=1e-9)


def test_calibration_corrections_with_auto_objective_validate_one_choice_per_plan(fresh):
    _on_calibration(fresh, "auto")
    names = fresh.cfg.alloc.auto_objectives
    val, plans = {}, set()
    for name in names:
        fresh.set_objective(pipeline.load_objective(fresh, name, progress=False))
        fids = _fidelities(fresh, BUDGET)
        c = max(fids, key=fids.get)
        plan = pipeline.allocate(fresh, "dp", BUDGET)
        val[name] = (pipeline.validate_plan(fresh, plan, 1.0, c), c)
        plans.add((plan.key(), c))
    out = selection.calibrate(fresh, "dp", BUDGET)
    best = max(names, key=lambda n: val[n][0])
    assert out["objective"]["name"] == best and out["objective"]["chosen_on"] == "validation"
    assert out["evaluations"] == len(plans)
    assert out["corrections"]["chosen_on"] == "calibration"
    assert (fresh.cfg.eval.bias_correction, fresh.cfg.eval.bn_reestimate) == \
        (val[best][1].bias_correction, val[best][1].bn_reestimate)


def test_bad_corrections_setting_is_named():
    with pytest.raises(ConfigError, match="eval.corrections must be one of"):
        tiny_config("eval.corrections=sometimes")
