"""The run directory helpers: reading a run back, the summary line."""

from __future__ import annotations

import pytest

from automl_compress.commands import rundir
from automl_compress.config import dump_config, load_config
from automl_compress.errors import CorruptCacheError
from automl_compress.plan import CompressionPlan, LayerPlan

RES = {"method": "dp", "metric_name": "top1", "metric": 0.91234, "metric_val": 0.9, "metric_dense":
       0.95, "metric_dense_val": 0.94, "avg_bits": 2.9994, "budget_bits": 3.0,
       "compression_ratio": 10.5, "objective": "normalized", "proxy_error": 0.00123456,
       "evaluations": 6.0, "wall_seconds": 2.04}


def test_load_run_reads_config_and_plan_and_overrides_the_device(tmp_path):
    cfg = load_config(None, ["device=cpu", "seed=3"])
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    plan = CompressionPlan({"fc": LayerPlan("dense", (2, 4))}, meta={"method": "dp"})
    plan.save(tmp_path / "plan.json")
    got_cfg, got_plan = rundir.load_run(tmp_path, device="cuda")
    assert got_cfg.seed == 3 and got_cfg.device == "cuda"
    assert got_plan.to_dict() == plan.to_dict()
    assert rundir.load_run(tmp_path)[0].device == "cpu"


def test_load_run_names_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(CorruptCacheError, match="not a run directory.*plan.json"):
        rundir.load_run(tmp_path)


def test_summary_line(capsys, tmp_path):
    line = ("dp: top1 0.9123 test / 0.9000 val (dense 0.9500 / 0.9400), avg_bits 2.999 (budget 3),"
            " 10.50x smaller, normalized proxy 0.001235, 6 evaluations, 2.0 s")
    assert rundir.summary_line(RES) == line
    rundir.print_summary(RES, tmp_path)
    assert capsys.readouterr().out == f"{line} -> {tmp_path}\n"
