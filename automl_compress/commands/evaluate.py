"""``automl-compress evaluate RUN``: re-score a run's plan and update its results.json."""

from __future__ import annotations

import json
import time
from pathlib import Path

from automl_compress import pipeline
from automl_compress.commands import rundir
from automl_compress.io import atomic_write_json


def run(run_dir: str | Path, device: str | None = None) -> int:
    """Re-score the run's plan on the test and validation splits and print its summary line.

    An existing results.json keeps its other keys (the metrics and the secondary ``metrics`` are
    replaced); without one, the whole run directory is written as ``compress`` would.

    Args:
        run_dir: a run directory (config.yaml and plan.json).
        device: replaces the recorded device.

    Returns:
        0 on success.

    Raises:
        CorruptCacheError: ``run_dir`` is not a run directory.
    """
    t0 = time.perf_counter()
    cfg, plan = rundir.load_run(run_dir, device)
    prepared = pipeline.prepare(cfg, run_dir)
    value = pipeline.evaluate_plan(prepared, plan)
    path = Path(run_dir) / "results.json"
    if path.is_file():
        res = json.loads(path.read_text())
        res["metric"] = value
        res["metric_dense"] = prepared.dense_metric()
        res["metric_val"] = pipeline.validate_plan(prepared, plan)
        res["metric_dense_val"] = prepared.dense_val()
        report = pipeline.plan_report(prepared, plan)
        if report is not None:
            res["metrics"] = report
        atomic_write_json(path, res)
    else:
        method = str(plan.meta.get("method", "unknown"))
        res = rundir.write_run(run_dir, cfg, prepared, plan, method, value,
                               time.perf_counter() - t0)
    rundir.print_summary(res, run_dir)
    return 0
