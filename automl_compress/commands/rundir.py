"""The run directory: what every command writes and reads back (keys in docs/architecture.md).

:func:`write_run` writes ``config.yaml``, ``plan.json`` and ``results.json`` atomically, the
results from :func:`results_dict`; :func:`load_run` reads a run's config and plan back;
:func:`summary_line` is the one line a command prints for a run, :func:`print_against_baselines`
that line followed by the DP and uniform plans at the same budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from automl_compress import pipeline
from automl_compress.config import Config, dump_config, load_config
from automl_compress.database.allocate import plan_avg_bits, plan_bits, plan_error
from automl_compress.database.costs import kept_per_row
from automl_compress.errors import CorruptCacheError, InfeasibleBudgetError
from automl_compress.io import atomic_write_json, atomic_write_text
from automl_compress.plan import CompressionPlan

RESULT_KEYS = (
    "method", "metric_name", "metric_dense", "metric", "metric_val", "metric_dense_val",
    "budget_bits", "avg_bits", "size_bytes", "compression_ratio", "objective",
    "objective_choice", "proxy_error",
    "evaluations", "metric_calls", "forward_samples", "corrections", "wall_seconds", "provenance",
    "layers",
)


def provenance(prepared: pipeline.Prepared) -> dict[str, Any]:
    """What, beside the config and seed, a run's numbers depend on.

    The dense model's and calibration data's fingerprints (a zoo model trained in-process can
    come out different on another CPU, whose kernels sum in another order), the solver version,
    and the software and threads the run had. Two runs with the same config, seed and provenance
    give the same plan (docs/benchmarks.md, "What varies a result").
    """
    import torch

    fp = prepared.db.fingerprints
    return {"model": fp.get("model"), "calibration": fp.get("calibration"),
            "solver": fp.get("solver"), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


def _layer_rows(prepared: pipeline.Prepared, plan: CompressionPlan) -> list[dict[str, Any]]:
    out = []
    for t in prepared.tables_for(plan):
        lp = plan.layers[t.info.name]
        hist: dict[str, int] = {}
        for b in lp.row_bits:
            hist[str(b)] = hist.get(str(b), 0) + 1
        kept = sum(kept_per_row(t.info.cols, lp.pattern) for b in lp.row_bits if b > 0)
        out.append({
            "name": t.info.name,
            "rows": t.info.rows,
            "cols": t.info.cols,
            "bits_histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
            "sparsity": 1.0 - kept / max(t.info.numel, 1),
            "error": t.error_of(lp.pattern, np.asarray(lp.row_bits)),
        })
    return out


def results_dict(
    prepared: pipeline.Prepared, plan: CompressionPlan, method: str, metric_value: float,
    wall_seconds: float, selection: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The results.json content, keys in :data:`RESULT_KEYS` order.

    Args:
        prepared: the task, its tables, objective and corrections in force.
        plan: the run's plan.
        method: what made the plan ('dp', 'evo', 'rl', ...).
        metric_value: the plan's test-split metric.
        wall_seconds: the run's wall time.
        selection: what choosing the plan spent on the validation split: ``metric_val``,
            ``evaluations`` (full validation passes), ``metric_calls``, ``forward_samples`` and
            ``corrections``; ``metric_val`` is measured here when absent.

    Returns:
        The results, JSON-ready.
    """
    cfg = prepared.cfg
    sel = dict(selection or {})
    tables = prepared.tables_for(plan)
    n_params = sum(p.numel() for p in prepared.task.model.parameters())
    compressible = sum(t.info.numel for t in tables)
    bits = plan_bits(plan, tables, cfg.cost) + 32.0 * (n_params - compressible)
    size_bytes = bits / 8.0
    metric_val = sel.get("metric_val")
    if metric_val is None:
        metric_val = pipeline.validate_plan(prepared, plan)
    return {
        "method": method,
        "metric_name": prepared.task.metric_name,
        "metric_dense": prepared.dense_metric(),
        "metric": float(metric_value),
        "metric_val": float(metric_val),
        "metric_dense_val": prepared.dense_val(),
        "budget_bits": float(plan.meta.get("budget_bits", cfg.env.budget_bits)),
        "avg_bits": plan_avg_bits(plan, tables, cfg.cost),
        "size_bytes": size_bytes,
        "compression_ratio": 4.0 * n_params / size_bytes if size_bytes > 0 else float("inf"),
        "objective": str(prepared.objective.name) if prepared.objective else "raw",
        "objective_choice": sel.get("objective_choice", {"name": cfg.alloc.objective,
                                                         "chosen_on": "config"}),
        "proxy_error": plan_error(plan, tables),
        "evaluations": float(sel.get("evaluations", 0.0)),
        "metric_calls": int(sel.get("metric_calls", 0)),
        "forward_samples": int(sel.get("forward_samples", 0)),
        "corrections": sel.get("corrections", {
            "bias_correction": cfg.eval.bias_correction, "bn_reestimate": cfg.eval.bn_reestimate,
            "chosen_on": "config"}),
        "wall_seconds": float(wall_seconds),
        "provenance": provenance(prepared),
        "layers": _layer_rows(prepared, plan),
    }


def write_config(out_dir: str | Path, cfg: Config) -> None:
    """Write ``out_dir/config.yaml`` (the resolved config) atomically, creating the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_config(cfg))


def write_run(
    out_dir: str | Path,
    cfg: Config,
    prepared: pipeline.Prepared,
    plan: CompressionPlan,
    method: str,
    metric: float,
    wall_seconds: float,
    extra: Mapping[str, Any] | None = None,
    selection: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write config.yaml, plan.json and results.json atomically.

    Args:
        out_dir: the run directory (created when missing).
        cfg: the config to record (usually :func:`~automl_compress.pipeline.resolved_config`).
        prepared: the task the plan was made for.
        plan: the run's plan.
        method: what made the plan.
        metric: the plan's test-split metric.
        wall_seconds: the run's wall time.
        extra: entries appended after the stable keys (never replacing them).
        selection: see :func:`results_dict`.

    Returns:
        The results written (the task's secondary ``metrics`` after the stable keys, if any).
    """
    out = Path(out_dir)
    write_config(out, cfg)
    plan.save(out / "plan.json")
    res = results_dict(prepared, plan, method, metric, wall_seconds, selection)
    report = pipeline.plan_report(prepared, plan)
    if report is not None:
        res["metrics"] = report
    for k, v in (extra or {}).items():
        res.setdefault(k, v)
    atomic_write_json(out / "results.json", res)
    return res


def load_run(run_dir: str | Path, device: str | None = None) -> tuple[Config, CompressionPlan]:
    """A run directory's config and plan.

    Args:
        run_dir: a folder written by ``compress``, ``train`` or ``apply``.
        device: replaces the recorded ``device`` when given.

    Returns:
        The recorded config and plan.

    Raises:
        CorruptCacheError: the folder lacks config.yaml or plan.json.
        ConfigError: the recorded config is not valid here.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "plan.json").is_file():
        raise CorruptCacheError(
            f"{str(run_dir)!r} is not a run directory: expected config.yaml and plan.json "
            "written by `automl-compress compress` or `train`"
        )
    cfg = load_config(run_dir / "config.yaml")
    if device is not None:
        cfg = dataclasses.replace(cfg, device=device)
    return cfg, CompressionPlan.load(run_dir / "plan.json")


def summary_line(res: Mapping[str, Any]) -> str:
    """One line of a run's results: test and validation metric, size, what selection spent."""
    return (
        f"{res['method']}: {res['metric_name']} {res['metric']:.4f} test / "
        f"{res['metric_val']:.4f} val (dense {res['metric_dense']:.4f} / "
        f"{res['metric_dense_val']:.4f}), avg_bits {res['avg_bits']:.3f} (budget "
        f"{res['budget_bits']:g}), {res['compression_ratio']:.2f}x smaller, {res['objective']} "
        f"proxy {res['proxy_error']:.4g}, {res['evaluations']:g} evaluations, "
        f"{res['wall_seconds']:.1f} s"
    )


def print_summary(res: Mapping[str, Any], out: str | Path) -> None:
    """Print :func:`summary_line` and the run directory."""
    print(f"{summary_line(res)} -> {Path(out)}")


def print_against_baselines(prepared: pipeline.Prepared, res: Mapping[str, Any], out: str | Path,
                            extra: str) -> None:
    """Print the run's line, then dp and uniform at the same budget (what the search bought).

    Args:
        prepared: the task, with the objective and corrections the run used.
        res: the run's results.
        out: the run directory.
        extra: appended to the run's line (e.g. ``"256 env steps"``).
    """
    print(f"{summary_line(res)}, {extra} -> {Path(out)}")
    budget = float(res["budget_bits"])
    for method in ("dp", "uniform"):
        try:
            plan = pipeline.allocate(prepared, method, budget)
        except InfeasibleBudgetError:
            print(f"  {method:>7}: infeasible at {budget:g} bits")
            continue
        test = pipeline.evaluate_plan(prepared, plan)
        val = pipeline.validate_plan(prepared, plan)
        print(f"  {method:>7}: {res['metric_name']} {test:.4f} test / {val:.4f} val, avg_bits "
              f"{plan_avg_bits(plan, prepared.tables_for(plan), prepared.cfg.cost):.3f}"
              f" (same objective and corrections)")
