"""The library's budget check: one function, called once per command path, before anything is
spent on the validation split."""

from __future__ import annotations

import pytest
from _compress_task import tiny_config

from automl_compress import pipeline, selection
from automl_compress.database.allocate import (
    allocate_dp,
    allocate_uniform,
    min_feasible_avg_bits,
    uniform_candidates,
)
from automl_compress.errors import ConfigError, InfeasibleBudgetError

TASK = "_compress_task:make_task"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The tiny task with no 0-bit option, so the smallest feasible budget is above zero."""
    cfg = tiny_config(f"task.name={TASK}", "menu.bits=[2, 4, 8]")
    return pipeline.prepare(cfg, tmp_path_factory.mktemp("budget"), progress=False)


@pytest.fixture()
def counted(monkeypatch):
    """Counts the calls of pipeline.check_budget (and of validate_plan, what a check guards)."""
    calls = {"check_budget": 0, "validate_plan": 0}
    check, validate = pipeline.check_budget, pipeline.validate_plan

    def check_budget(*args, **kwargs):
        calls["check_budget"] += 1
        return check(*args, **kwargs)

    def validate_plan(*args, **kwargs):
        calls["validate_plan"] += 1
        return validate(*args, **kwargs)

    monkeypatch.setattr(pipeline, "check_budget", check_budget)
    monkeypatch.setattr(pipeline, "validate_plan", validate_plan)
    return calls


def test_check_budget_accepts_the_minimum_and_names_it_below(prepared):
    minimum = min_feasible_avg_bits(prepared.tables, prepared.cfg.cost)
    assert minimum > 1.0
    pipeline.check_budget(prepared, minimum)
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible budget") as info:
        pipeline.check_budget(prepared, minimum - 0.01)
    assert info.value.minimum == pytest.approx(minimum)
    assert info.value.budget == pytest.approx(minimum - 0.01)


def _message(fn, *args, **kwargs) -> str:
    with pytest.raises(InfeasibleBudgetError) as info:
        fn(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("method", ["uniform", "rtn"])
def test_uniform_and_rtn_need_one_option_everywhere(prepared, method):
    tables = prepared.rtn_tables if method == "rtn" else prepared.tables
    minimum = min(c[2] for c in uniform_candidates(tables, prepared.cfg.cost))
    pipeline.check_budget(prepared, minimum, method)
    got = _message(pipeline.check_budget, prepared, minimum - 0.01, method)
    assert "uniform: one bit-width everywhere" in got
    # the same words as the allocator's own guard (what `compress` printed before the check)
    assert got == _message(allocate_uniform, tables, minimum - 0.01, prepared.cfg.cost)


def test_the_dp_check_says_what_the_allocator_says(prepared):
    low = min_feasible_avg_bits(prepared.tables, prepared.cfg.cost) - 0.01
    assert _message(pipeline.check_budget, prepared, low) == \
        _message(allocate_dp, prepared.tables, low, prepared.cfg.cost)


def test_compress_checks_the_budget_once(prepared, counted):
    plan, sel = selection.compress(prepared, "dp", 3.0)
    assert counted["check_budget"] == 1
    assert plan.meta["method"] == "dp" and sel["corrections"]["chosen_on"] == "validation"


def test_an_infeasible_search_spends_no_evaluation(prepared, counted):
    with pytest.raises(InfeasibleBudgetError):
        selection.compress(prepared, "evo", 1.0, evaluations=20)
    assert counted == {"check_budget": 1, "validate_plan": 0}


def test_an_unknown_method_is_named_before_the_budget(prepared):
    with pytest.raises(ConfigError, match="method must be one of"):
        selection.compress(prepared, "annealing", 0.5)


def test_resolve_device_names_a_cuda_device_this_torch_cannot_see():
    """device=cuda without CUDA is a ConfigError that says what to do, not torch's assertion
    deep in the capture; with CUDA it is kept, and 'auto' picks what is there."""
    import torch

    assert pipeline.resolve_device("cpu") == "cpu"
    assert pipeline.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert pipeline.resolve_device("cuda") == "cuda"
    else:
        with pytest.raises(ConfigError, match="device=auto or device=cpu"):
            pipeline.resolve_device("cuda")
