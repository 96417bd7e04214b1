"""End to end on the real digits task: `train`, `--resume`, `apply` on the wider sibling.

These run the real pipeline (database build, stitched-model metric with BN re-estimation) with a
short search; the database of each run is built once per module.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from automl_compress import pipeline, selection
from automl_compress.agents import run as agent_run
from automl_compress.cli import main
from automl_compress.commands import apply as apply_cmd
from automl_compress.commands import train as train_cmd
from automl_compress.config import load_config
from automl_compress.errors import PolicyMismatchError
from automl_compress.io import atomic_write_json
from automl_compress.plan import CompressionPlan

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["agent.n_steps=64", "agent.batch_size=32", "agent.n_epochs=2", "agent.round_steps=128",
         "agent.final_candidates=2", "agent.checkpoint_every=128"]


def _sets(items):
    out = []
    for s in items:
        out += ["--set", s]
    return out


@pytest.fixture(scope="module")
def train_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("digits") / "run"
    rc = main(["train", "--config", str(ROOT / "configs/digits.yaml"), "--budget-bits", "3",
               "--total-steps", "128", "--out", str(run), *_sets(SHORT)])
    assert rc == 0
    # continue the same run to 256 steps from its checkpoint
    rc = main(["train", "--config", str(ROOT / "configs/digits.yaml"), "--budget-bits", "3",
               "--total-steps", "256", "--out", str(run), "--resume", *_sets(SHORT)])
    assert rc == 0
    return run


def test_train_writes_the_run(train_run):
    for f in ("config.yaml", "plan.json", "results.json", "policy/manifest.json",
              "policy/layer_controller.zip", "policy/channel_controller.zip",
              "policy/checkpoint.json"):
        assert (train_run / f).is_file(), f
    res = json.loads((train_run / "results.json").read_text())
    assert res["method"] == "rl"
    assert res["avg_bits"] <= 3.0 + 1e-9
    assert 0.0 <= res["metric"] <= 1.0 and res["metric_dense"] > 0.9
    assert res["env_steps"] >= 256  # the resumed run continued to the new total
    ck = json.loads((train_run / "policy/checkpoint.json").read_text())
    assert ck["steps"] == res["env_steps"]
    plan = CompressionPlan.load(train_run / "plan.json")
    assert plan.meta["method"] == "rl"
    assert len(plan.layers) == len(res["layers"])


def test_train_tensorboard_tags(train_run):
    acc = EventAccumulator(str(train_run / "tb/search"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"episode/reward", "episode/metric", "episode/avg_bits", "episode/proxy_error",
            "episode/projections", "search/best_metric"} <= set(tags["scalars"])
    assert "episode/allocation" in tags["images"]
    assert {"config/text_summary", "plan/best/text_summary"} <= set(tags["tensors"])
    for run in ("layer_controller", "channel_controller"):
        acc = EventAccumulator(str(train_run / "tb" / run))
        acc.Reload()
        assert any(t.startswith("train/") for t in acc.Tags()["scalars"]), run


@pytest.fixture(scope="module")
def wide_apply(train_run, tmp_path_factory) -> Path:
    """An unchecked zero-shot `apply` of the digits policy on the wider sibling."""
    cfg = load_config(ROOT / "configs/digits_wide.yaml", ["env.budget_bits=3.0"])
    out = tmp_path_factory.mktemp("wide") / "run"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "a zero-shot rollout of a policy")
        assert apply_cmd.run(cfg, out, policy_dir=train_run, finetune_steps=0,
                             progress=False) == 0
    return out


def test_apply_on_the_wider_sibling(train_run, wide_apply):
    res = json.loads((wide_apply / "results.json").read_text())
    assert res["method"] == "rl" and res["zero_shot"] is True
    assert res["avg_bits"] <= 3.0 + 1e-9
    assert res["metric"] > 0.5  # the wide digits CNN stays a working classifier at 3 bits
    assert json.loads((train_run / "results.json").read_text())["layers"][0]["rows"] < \
        res["layers"][0]["rows"]


def test_zero_shot_on_another_model_chooses_its_corrections_on_calibration_fidelity(
        train_run, wide_apply):
    """No validation evaluation, the policy's objective, the most faithful corrections there."""
    res = json.loads((wide_apply / "results.json").read_text())
    manifest = json.loads((train_run / "results.json").read_text())
    assert res["evaluations"] == 0
    corr = res["corrections"]
    assert corr["chosen_on"] == "calibration" and corr["evaluations"] == 0
    assert corr["calibration_passes"] == len(corr["scores"]) > 1
    best = max(corr["scores"].values())
    label = f"{'bias' if corr['bias_correction'] else 'nobias'}+{corr['bn_reestimate']}"
    assert corr["scores"][label] == best
    assert res["objective_choice"]["name"] == manifest["objective_choice"]["name"]
    # re-measured directly: the fidelity the choice recorded is the stitched model's
    cfg = load_config(ROOT / "configs/digits_wide.yaml", ["env.budget_bits=3.0"])
    prepared = pipeline.prepare(cfg, wide_apply, db_dir=wide_apply / "db", progress=False)
    prepared.set_objective(pipeline.load_objective(prepared, res["objective_choice"]["name"],
                                                   progress=False))
    dp_plan = pipeline.allocate(prepared, "dp", 3.0)
    c = next(c for c in selection.correction_choices(prepared) if selection._label(c) == label)
    assert pipeline.calibration_fidelity(prepared, dp_plan, c) == pytest.approx(best)


def test_checked_zero_shot_on_another_model_is_compared_with_dp_as_dp_runs_there(
        train_run, wide_apply, tmp_path):
    """On another model `--check-dp` chooses the objective and corrections there, as dp does.

    So its validation score is never below dp's own, and it spends dp's choice plus the check.
    """
    cfg = load_config(ROOT / "configs/digits_wide.yaml", ["env.budget_bits=3.0"])
    out = tmp_path / "checked"
    out.mkdir()
    (out / "db").symlink_to(wide_apply / "db")  # the wide database, built once
    assert apply_cmd.run(cfg, out, policy_dir=train_run, progress=False, check_dp=True) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["zero_shot"] is True and res["checked_against_dp"] is True
    assert res["corrections"]["chosen_on"] == "validation"
    assert res["objective_choice"]["chosen_on"] == "validation"
    prepared = pipeline.prepare(cfg, out, db_dir=out / "db", progress=False)
    dp_plan, dp_sel = selection.compress(prepared, "dp", 3.0)
    assert res["evaluations"] - dp_sel["evaluations"] in (1.0, 2.0)
    assert res["metric_val"] >= pipeline.validate_plan(prepared, dp_plan) - 1e-12


def test_unchecked_zero_shot_on_another_model_warns_to_check_dp(train_run):
    wide = load_config(ROOT / "configs/digits_wide.yaml", ["env.budget_bits=3.0"])
    with pytest.warns(UserWarning, match="--check-dp"):
        agent_run.open_policy(wide, train_run)
    same = load_config(ROOT / "configs/digits.yaml", ["env.budget_bits=3.0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        agent_run.open_policy(wide, train_run, check_dp=True)
        agent_run.open_policy(wide, train_run, evaluations=8)
        agent_run.open_policy(same, train_run)


def test_apply_with_an_incompatible_menu_is_named_error(train_run, tmp_path):
    cfg = load_config(ROOT / "configs/digits_wide.yaml", ["menu.bits=[0, 2, 4, 8]"])
    with pytest.raises(PolicyMismatchError, match="menu.bits"):
        apply_cmd.run(cfg, tmp_path / "x", policy_dir=train_run, progress=False)


def test_apply_from_a_folder_without_policy_is_named_error(tmp_path):
    cfg = load_config(ROOT / "configs/digits_wide.yaml")
    with pytest.raises(PolicyMismatchError, match="manifest.json"):
        apply_cmd.run(cfg, tmp_path / "x", policy_dir=tmp_path, progress=False)


def test_resumed_anchored_train_starts_from_the_checkpoints_incumbents(train_run, tmp_path):
    """`--resume` of an `env.coef_anchor=best` run moves from the incumbents it had found."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "db").symlink_to(train_run / "db")  # the same digits database, built once
    args = ["train", "--config", str(ROOT / "configs/digits.yaml"), "--budget-bits", "1",
            "--out", str(run), *_sets([*SHORT, "env.coef_anchor=best"])]
    assert main([*args, "--total-steps", "128"]) == 0
    ckpt = run / "policy" / "checkpoint.json"
    state = json.loads(ckpt.read_text())
    assert state["anchors"], "the anchored run kept no incumbent"
    # a score no plan can reach: only an incumbent restored from the checkpoint can carry it
    for inc in state["anchors"].values():
        inc["metric"] = 2.0
    # and a spend no run makes: only the count restored from the checkpoint can carry it on
    assert set(state["evaluations_by_budget"]) == {"1"}
    state["evaluations_by_budget"]["1"] += 1000.0
    atomic_write_json(ckpt, state)
    assert main([*args, "--total-steps", "256", "--resume"]) == 0
    resumed = json.loads(ckpt.read_text())
    assert resumed["steps"] >= 256
    assert resumed["anchors"] == state["anchors"]
    assert resumed["evaluations_by_budget"]["1"] >= state["evaluations_by_budget"]["1"]
    res = json.loads((run / "results.json").read_text())
    assert res["evaluations_by_budget"] == resumed["evaluations_by_budget"]


def test_zero_shot_apply_on_the_same_model_moves_from_the_runs_incumbents(train_run, tmp_path,
                                                                          capsys):
    """`apply` on the policy's own database, objective and corrections starts from its plans;
    at a budget between the ones it trained at, from the plan of the nearest budget below."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "db").symlink_to(train_run / "db")
    assert main(["train", "--config", str(ROOT / "configs/digits.yaml"), "--budget-bits", "1",
                 "--out", str(run), "--total-steps", "128", *_sets(SHORT)]) == 0
    ckpt = run / "policy" / "checkpoint.json"
    state = json.loads(ckpt.read_text())
    assert state["anchors"], "the run kept no incumbent"
    # an incumbent far from the DP plan: the first layer least important, the others most
    top = json.loads((run / "policy/manifest.json").read_text())["env"]["coef_levels"] - 1
    for inc in state["anchors"].values():
        inc["u"] = [0] + [top] * (len(inc["u"]) - 1)
    atomic_write_json(ckpt, state)
    cfg = load_config(ROOT / "configs/digits.yaml", ["env.budget_bits=1.0"])

    def apply(name):
        out = tmp_path / name
        out.mkdir()
        (out / "db").symlink_to(train_run / "db")
        assert apply_cmd.run(cfg, out, policy_dir=run, progress=False) == 0
        return (json.loads((out / "results.json").read_text()),
                CompressionPlan.load(out / "plan.json"))

    res, plan = apply("same")
    assert res["zero_shot"] is True and res["incumbent_start"] is True
    assert res["incumbent_lent_from"] is None
    # a single-budget policy lends nothing: 1.25 bits is not between budgets it trained at
    cfg = load_config(ROOT / "configs/digits.yaml", ["env.budget_bits=1.25"])
    single, from_dp = apply("above")
    assert single["incumbent_lent_from"] is None and single["incumbent_start"] is False
    # as if it had trained at 1 and 1.5 bits: 1.25 starts from the 1-bit incumbent, re-planned
    manifest_path = run / "policy/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["budgets"] == [1.0]
    manifest["budgets"] = [1.0, 1.5]
    atomic_write_json(manifest_path, manifest)
    capsys.readouterr()
    lent, lent_plan = apply("between")
    assert lent["incumbent_lent_from"] == 1.0 and lent["incumbent_start"] is True
    assert "zero-shot from the policy's 1-bit plan" in capsys.readouterr().out
    layer = next(iter(lent_plan.layers))
    assert lent_plan.layers[layer].row_bits != from_dp.layers[layer].row_bits
    # a manifest older than `budgets` lends nothing
    del manifest["budgets"]
    atomic_write_json(manifest_path, manifest)
    assert apply("between_old")[0]["incumbent_lent_from"] is None
    cfg = load_config(ROOT / "configs/digits.yaml", ["env.budget_bits=1.0"])
    # the incumbents of another database, objective or corrections mean other plans: unused
    state["incumbent_key"] = "another"
    atomic_write_json(ckpt, state)
    other, dp_start = apply("other")
    assert other["incumbent_start"] is False
    first = next(iter(plan.layers))
    assert plan.layers[first].row_bits != dp_start.layers[first].row_bits


def test_train_rejects_bad_steps(tmp_path):
    from automl_compress.errors import ConfigError

    with pytest.raises(ConfigError, match="total-steps"):
        train_cmd.run(load_config(ROOT / "configs/digits.yaml"), tmp_path, total_steps=0)


@pytest.mark.slow
def test_killed_train_leaves_a_checkpoint_and_resume_finishes(tmp_path):
    """A plain `kill` (SIGTERM) mid-search writes a checkpoint; `--resume` continues from it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    args = [sys.executable, "-m", "automl_compress.cli", "train", "--config",
            str(ROOT / "configs/digits.yaml"), "--budget-bits", "3", "--out", str(run),
            *_sets([*SHORT, "solver.quant=gptq", "agent.checkpoint_every=64"])]
    proc = subprocess.Popen([*args, "--total-steps", "100000"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    ckpt = run / "policy" / "checkpoint.json"
    deadline = time.monotonic() + 300
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ckpt.is_file(), proc.communicate()[1] if proc.poll() is not None else "no checkpoint"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    stopped = json.loads(ckpt.read_text())["steps"]
    assert 0 < stopped < 100000
    assert not (run / "results.json").exists()
    done = subprocess.run([*args, "--total-steps", str(stopped + 128), "--resume"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert f"resuming from step {stopped}" in done.stdout
    res = json.loads((run / "results.json").read_text())
    assert res["env_steps"] >= stopped + 128 and res["avg_bits"] <= 3.0 + 1e-9


def test_sigterm_is_an_interrupt_only_while_training():
    import os
    import signal
    import time

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), train_cmd.terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler interrupts the sleep
    assert signal.getsignal(signal.SIGTERM) is before
