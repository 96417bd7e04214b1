"""End to end on the tiny task: the coefficient form trained for a budget range under an
evaluation budget, then applied zero-shot over the range and fine-tuned."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from automl_compress.cli import main
from automl_compress.plan import CompressionPlan

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from _compress_task import TINY_YAML  # noqa: E402

CONFIG = TINY_YAML + """\
env:
  metric_every: 1
agent:
  action: coefficient
  n_steps: 64
  batch_size: 32
  n_epochs: 2
  round_steps: 128
  final_candidates: 2
  metric_fraction: 0.5
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("range")
    (root / "c.yaml").write_text(CONFIG)
    run = root / "run"
    rc = main(["train", "--config", str(root / "c.yaml"), "--budget-bits", "3",
               "--budget-range", "2.5", "3.5", "--evaluations", "24", "--out", str(run)])
    assert rc == 0
    return root, run


def test_train_spends_at_most_its_evaluations(trained):
    _, run = trained
    res = json.loads((run / "results.json").read_text())
    assert res["method"] == "rl" and res["action"] == "coefficient"
    assert 0 < res["evaluations"] <= 24 + 1e-9
    assert res["budget_range"] == [2.5, 3.5] and res["avg_bits"] <= 3.0 + 1e-9
    assert res["metric_val"] is not None
    # the training's passes by budget: grid budgets only, within what the run spent
    by = res["evaluations_by_budget"]
    assert len(by) >= 2 and set(by) <= {"2.5", "2.75", "3", "3.25", "3.5"}
    assert 0 < sum(by.values()) <= res["evaluations"]
    manifest = json.loads((run / "policy/manifest.json").read_text())
    assert manifest["budget_range"] == [2.5, 3.5]
    assert manifest["controllers"]["action"] == "coefficient"


@pytest.mark.parametrize("budget", [2.5, 2.625, 3.25, 3.4, 3.5])
def test_apply_zero_shot_over_the_range_spends_nothing(trained, budget, capsys):
    """On the grid and between it (2.625, 3.4: from another budget's plan when one lies below)
    the budget is met and nothing is spent; the database is the training run's (--db)."""
    root, run = trained
    out = root / f"apply-{budget}"
    rc = main(["apply", "--policy", str(run), "--config", str(root / "c.yaml"),
               "--budget-bits", str(budget), "--db", str(run / "db"), "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["zero_shot"] and res["evaluations"] == 0
    lent = res["incumbent_lent_from"]
    assert lent is None or (lent < budget and budget not in (2.5, 3.25, 3.5))
    assert res["avg_bits"] <= budget + 1e-9
    assert CompressionPlan.load(out / "plan.json").meta["budget_bits"] == budget
    text = capsys.readouterr().out
    assert "dp:" in text and "uniform:" in text  # printed next to the baselines


def test_apply_zero_shot_keeps_the_policy_objective_and_spends_nothing(trained, tmp_path):
    root, run = trained
    trained_on = json.loads((run / "results.json").read_text())["objective"]
    manifest = json.loads((run / "policy/manifest.json").read_text())
    assert manifest["objective"] == trained_on  # what train chose, recorded for apply
    old = tmp_path / "old_policy"  # a policy written before the manifest named its objective
    shutil.copytree(run / "policy", old)
    del manifest["objective"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    for policy, expected in ((run, trained_on), (old, "normalized")):
        out = tmp_path / f"apply-{policy.name}"
        assert main(["apply", "--policy", str(policy), "--config", str(root / "c.yaml"),
                     "--budget-bits", "3", "--out", str(out)]) == 0
        res = json.loads((out / "results.json").read_text())
        assert res["evaluations"] == 0 and res["objective"] == expected


def test_apply_fine_tuned_within_its_evaluations(trained):
    root, run = trained
    out = root / "finetune"
    rc = main(["apply", "--policy", str(run), "--config", str(root / "c.yaml"),
               "--budget-bits", "3", "--evaluations", "24", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert not res["zero_shot"] and 0 < res["evaluations"] <= 24 + 1e-9
    assert res["metric_val"] >= 0.0 and (out / "policy/manifest.json").is_file()


def test_apply_check_dp_scores_rollout_and_dp_on_validation(trained, capsys):
    root, run = trained
    out = root / "checked"
    assert main(["apply", "--policy", str(run), "--config", str(root / "c.yaml"),
                 "--budget-bits", "2.5", "--check-dp", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    # two plans scored, or one when the rollout is the DP plan (a repeated plan is free)
    assert res["zero_shot"] and res["checked_against_dp"] and res["evaluations"] in (1, 2)
    assert res["metric_val"] is not None
    assert CompressionPlan.load(out / "plan.json").meta["kept"] in ("policy", "dp")
    assert "checked against dp" in capsys.readouterr().out


def test_check_dp_with_fine_tuning_is_refused_before_any_work(trained, tmp_path, capsys):
    root, run = trained
    out = tmp_path / "x"
    assert main(["apply", "--policy", str(run), "--config", str(root / "c.yaml"),
                 "--budget-bits", "3", "--evaluations", "12", "--check-dp", "--out",
                 str(out)]) == 2
    assert "--check-dp is for a zero-shot apply" in capsys.readouterr().err
    assert not out.exists()  # refused before the database or the run directory
