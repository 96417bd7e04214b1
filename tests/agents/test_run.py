"""The train/apply library (automl_compress/agents/run.py) without training: the budget checked
once, the corrections chosen, the evaluation budget split, the arguments checked up front, a
zero-shot rollout checked against the DP plan."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _compress_task import tiny_config
from synth import synth_config, synth_tables

from automl_compress import pipeline
from automl_compress.agents import run as agent_run
from automl_compress.agents.hierarchical import Search
from automl_compress.agents.transfer import policy_folder
from automl_compress.database.allocate import plan_error
from automl_compress.errors import ConfigError, InfeasibleBudgetError, PolicyMismatchError

TASK = "_compress_task:make_task"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cfg = tiny_config(f"task.name={TASK}", "menu.bits=[2, 4, 8]", "env.budget_bits=3.0")
    return pipeline.prepare(cfg, tmp_path_factory.mktemp("run"), progress=False)


def test_start_training_checks_the_budget_once_and_splits_the_evaluations(prepared, tmp_path,
                                                                          monkeypatch):
    calls = []
    check = pipeline.check_budget
    monkeypatch.setattr(pipeline, "check_budget", lambda p, b: calls.append(b) or check(p, b))
    training = agent_run.start_training(prepared, tmp_path / "policy", 64, evaluations=20,
                                        resume=True)
    assert calls == [3.0]
    assert training.resumed_steps is None and training.models is None  # no checkpoint there
    spent = training.calibration["evaluations"]
    assert spent > 0 and training.evaluations == pytest.approx(20 - spent)
    chosen = training.calibration["corrections"]
    assert prepared.cfg.eval.bias_correction == chosen["bias_correction"]
    assert training.total_steps == 64


def test_start_training_below_the_minimum_raises_before_any_evaluation(prepared, tmp_path,
                                                                        monkeypatch):
    import dataclasses

    def no_validation(*args, **kwargs):
        raise AssertionError("validated a plan for an infeasible budget")

    monkeypatch.setattr(pipeline, "validate_plan", no_validation)
    low = dataclasses.replace(prepared, cfg=dataclasses.replace(
        prepared.cfg, env=dataclasses.replace(prepared.cfg.env, budget_bits=1.0)))
    with pytest.raises(InfeasibleBudgetError, match="infeasible"):
        agent_run.start_training(low, tmp_path / "policy", 64)


def test_too_few_evaluations_for_training_are_named(prepared, tmp_path):
    with pytest.raises(ConfigError, match="leaves nothing for training"):
        agent_run.start_training(prepared, tmp_path / "policy", 64, evaluations=2)


def test_training_steps_default_and_minimum(prepared):
    assert agent_run.training_steps(prepared.cfg) == prepared.cfg.agent.total_steps
    assert agent_run.training_steps(prepared.cfg, 7) == 7
    with pytest.raises(ConfigError, match="total-steps"):
        agent_run.training_steps(prepared.cfg, 0)


def test_open_policy_checks_its_arguments_before_reading(prepared, tmp_path):
    with pytest.raises(ConfigError, match="finetune-steps"):
        agent_run.open_policy(prepared.cfg, tmp_path, finetune_steps=-1)
    with pytest.raises(PolicyMismatchError, match="manifest.json"):
        agent_run.open_policy(prepared.cfg, tmp_path)


def test_policy_folder_of_a_run_or_itself(tmp_path):
    assert policy_folder(tmp_path) == tmp_path
    (tmp_path / "policy").mkdir()
    assert policy_folder(tmp_path) == tmp_path / "policy"


@pytest.mark.parametrize("prefer", ["policy", "dp"])
def test_check_dp_keeps_the_better_of_an_untrained_rollout_and_the_dp_plan(prefer):
    # an untrained coefficient policy: its deterministic rollout is not the DP plan; the metric
    # rewards the proxy error (the rollout wins) or penalises it (the DP plan, its minimiser)
    tables = synth_tables(0)
    cfg = synth_config(3.0)
    cfg = dataclasses.replace(cfg, agent=dataclasses.replace(cfg.agent, action="coefficient"))
    sign = 1.0 if prefer == "policy" else -1.0
    search = Search(tables, cfg, metric_fn=lambda p: sign * plan_error(p, tables))
    with torch.no_grad():  # away from the neutral prior: coefficients that vary by layer
        net = search.models["layer_controller"].policy.action_net
        net.weight *= 1000.0
        net.bias.zero_()
    rollout = search.rollout(True, 3.0, measure=False).plan
    dp = search.dp_plan(3.0)
    assert rollout.layers != dp.layers
    plan, value = agent_run._final_plan(search, cfg, {}, zero_shot=True, check_dp=True)
    want = rollout if prefer == "policy" else dp
    assert plan.layers == want.layers and plan.meta["kept"] == prefer
    assert value == pytest.approx(sign * plan_error(want, tables))
    assert search.oracle.evaluations == 2
    search.close()


def test_check_dp_with_fine_tuning_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="zero-shot"):
        agent_run.open_policy(tiny_config(), tmp_path, finetune_steps=10, check_dp=True)
