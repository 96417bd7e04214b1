"""The commands end to end through the CLI: build-db, compress, evaluate, export on a tiny real
task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from automl_compress.cli import main
from automl_compress.commands.rundir import RESULT_KEYS
from automl_compress.export import load_compressed, read_plan
from automl_compress.plan import CompressionPlan

TESTS = Path(__file__).resolve().parents[1]

CONFIG = """\
task:
  name: "_compress_task:make_task"
menu:
  bits: [0, 2, 4, 8]
  patterns: [dense, "2:4", "50%"]
solver:
  quant: gptq
device: cpu
"""


@pytest.fixture()
def config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(CONFIG)
    return path


def test_compress_evaluate_export_in_process(config, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["build-db", "--config", str(config), "--out", str(run)]) == 0
    assert (run / "db" / "manifest.json").is_file()
    code = main(["compress", "--config", str(config), "--method", "dp", "--budget-bits", "3",
                 "--out", str(run)])
    assert code == 0, capsys.readouterr().err
    res = json.loads((run / "results.json").read_text())
    assert tuple(res) == (*RESULT_KEYS, "metrics")  # the task's secondary metrics come last
    assert res["method"] == "dp" and res["metric_name"] == "top1"
    assert set(res["metrics"]) == {"top3"} and res["metrics"]["top3"] >= res["metric"]
    assert res["budget_bits"] == 3.0 and 0 < res["avg_bits"] <= 3.0
    assert 0.0 <= res["metric"] <= 1.0 and res["metric_dense"] > 0.5
    n_params = sum(l["rows"] * l["cols"] for l in res["layers"])
    assert res["compression_ratio"] > 32 / 3.0 * 0.5  # biases/BN at 32 bits dilute the ratio
    assert res["size_bytes"] > res["avg_bits"] * n_params / 8
    assert [l["name"] for l in res["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    for layer in res["layers"]:
        assert sum(layer["bits_histogram"].values()) == layer["rows"]
        assert 0.0 <= layer["sparsity"] < 1.0 and layer["error"] >= 0.0
    assert res["proxy_error"] == pytest.approx(sum(l["error"] for l in res["layers"]))
    # provenance: the database's model fingerprint is the dense model's, and the run's threads
    manifest = json.loads((run / "db" / "manifest.json").read_text())["fingerprints"]
    prov = res["provenance"]
    assert prov["model"] == manifest["model"] and len(prov["model"]) == 64
    assert prov["calibration"] == manifest["calibration"]
    assert prov["solver"] == manifest["solver"] and prov["torch"] == torch.__version__
    assert prov["threads"] == torch.get_num_threads() and prov["cpu_capability"]
    plan = CompressionPlan.load(run / "plan.json")
    assert plan.meta["method"] == "dp"
    assert (run / "config.yaml").is_file()

    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 0
    again = json.loads((run / "results.json").read_text())
    assert again["metric"] == pytest.approx(res["metric"])
    assert again["metrics"] == pytest.approx(res["metrics"])

    assert main(["export", str(run)]) == 0
    assert "identical: True" in capsys.readouterr().out
    path = run / "compressed.safetensors"
    assert read_plan(path).to_dict() == plan.to_dict()
    sys.path.insert(0, str(TESTS))
    from _compress_task import make_task

    task = make_task()
    model = load_compressed(path, task)
    x = torch.cat(list(task.calib))
    acc = float(task.evaluate(model))
    assert acc == pytest.approx(res["metric"])
    assert model(x).shape == (len(x), 10)


def test_compress_with_corrections_on_calibration_spends_validation_only_on_the_objective(
        config, tmp_path):
    run = tmp_path / "run"
    assert main(["compress", "--config", str(config), "--method", "dp", "--budget-bits", "3",
                 "--set", "eval.corrections=calibration", "--out", str(run)]) == 0
    res = json.loads((run / "results.json").read_text())
    corr = res["corrections"]
    assert corr["chosen_on"] == "calibration" and corr["calibration_passes"] >= len(corr["scores"])
    assert len(corr["scores"]) > 1
    # auto: one validation pass per candidate objective's plan, none for the corrections
    assert res["evaluations"] == corr["evaluations"] <= len(res["objective_choice"]["scores"])
    # the run directory records the choice as fixed settings, so `evaluate` re-scores the same
    again = yaml.safe_load((run / "config.yaml").read_text())["eval"]
    assert again["corrections"] == "fixed"
    assert (again["bias_correction"], again["bn_reestimate"]) == (corr["bias_correction"],
                                                                  corr["bn_reestimate"])


def test_infeasible_budget_is_a_clear_error(config, tmp_path, capsys):
    code = main(["compress", "--config", str(config), "--method", "dp", "--budget-bits", "1",
                 "--set", "menu.bits=[2, 4, 8]", "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "infeasible" in err and "smallest feasible budget" in err
    assert not (tmp_path / "run" / "results.json").exists()


def test_console_script_compress_rtn_subprocess(config, tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "automl_compress.cli", "compress", "--config", str(config),
         "--method", "rtn", "--budget-bits", "4.5", "--out", str(run)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads((run / "results.json").read_text())
    assert res["method"] == "rtn" and res["avg_bits"] <= 4.5
    plan = CompressionPlan.load(run / "plan.json")
    widths = {b for lp in plan.layers.values() for b in lp.row_bits}
    assert len(widths) == 1 and widths <= {2, 4, 8}  # one width everywhere, the widest that fits
    assert res["avg_bits"] > 2.0
    assert all(lp.pattern == "dense" for lp in plan.layers.values())
    assert "rtn: top1" in proc.stdout
