"""The library functions behind ``build-db``, ``compress``, ``evaluate`` and ``export``.

``prepare`` loads the task and builds (or reuses) its layer database; ``evaluate_plan`` scores a
plan on the held-out split after statistics corrections; ``write_run`` writes a run directory
(``config.yaml``, ``plan.json``, ``results.json`` with the keys of DESIGN.md §3). The RL side calls
the same three functions.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from automl_compress.config import Config, dump_config, load_config
from automl_compress.database.allocate import (
    allocate_dp,
    allocate_uniform,
    plan_avg_bits,
    plan_bits,
    plan_error,
)
from automl_compress.database.build import build_database
from automl_compress.database.costs import kept_per_row
from automl_compress.database.store import LayerDatabase
from automl_compress.database.tables import LayerTable
from automl_compress.errors import ConfigError, CorruptCacheError
from automl_compress.evaluate import DenseStats, correct, dense_stats, metric
from automl_compress.io import atomic_write_json, atomic_write_text
from automl_compress.plan import CompressionPlan
from automl_compress.stitch import plan_source, stitch
from automl_compress.zoo.base import Task

METHODS = ("uniform", "dp", "rtn")
RESULT_KEYS = (
    "method", "metric_name", "metric_dense", "metric", "budget_bits", "avg_bits", "size_bytes",
    "compression_ratio", "proxy_error", "wall_seconds", "layers",
)


@dataclass
class Prepared:
    """A task with its layer database, ready for allocation and evaluation.

    Attributes:
        cfg: the resolved config.
        task: model, calibration data and metric.
        db: the layer database.
        tables: the layer tables in forward order.
        rtn_tables: the same layers' round-to-nearest tables (dense pattern only).
        db_dir: where the database lives.
    """

    cfg: Config
    task: Task
    db: LayerDatabase
    tables: list[LayerTable]
    rtn_tables: list[LayerTable]
    db_dir: Path
    _dense_metric: float | None = field(default=None, repr=False)
    _dense_stats: DenseStats | None = field(default=None, repr=False)

    def dense_metric(self) -> float:
        """The dense model's held-out metric (computed once)."""
        if self._dense_metric is None:
            self._dense_metric = metric(self.task.model, self.task)
        return self._dense_metric

    def dense_stats(self) -> DenseStats:
        """The dense model's calibration statistics for the corrections (measured once)."""
        if self._dense_stats is None:
            self._dense_stats = dense_stats(self.task.model, self.task)
        return self._dense_stats

    def tables_for(self, plan: CompressionPlan) -> list[LayerTable]:
        """The tables a plan's errors are read from (rtn tables for the rtn baseline)."""
        return self.rtn_tables if plan_source(plan) == "rtn" else self.tables


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when available, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _rtn_tables(db: LayerDatabase) -> list[LayerTable]:
    out = []
    for info in db.order:
        sol = db.layer(info.name)
        errs = np.asarray(sol.rtn_errors, dtype=np.float64)[:, None, :]
        out.append(LayerTable(info, sol.table.bits, ("dense",), errs))
    return out


def prepare(
    cfg: Config, out_dir: str | Path, db_dir: str | Path | None = None, progress: bool = True
) -> Prepared:
    """Load the task and build or reuse its layer database.

    Args:
        cfg: the resolved config.
        out_dir: the run directory; the database goes to ``out_dir/db`` unless ``db_dir``.
        db_dir: a shared database folder (e.g. a cache reused across runs of the same setup).
        progress: show the build progress bar.

    Raises:
        DatabaseMismatchError: the database folder holds another setup's database.
    """
    from automl_compress.zoo import load_task

    torch.manual_seed(cfg.seed)
    task = load_task(cfg.task)
    root = Path(db_dir) if db_dir is not None else Path(out_dir) / "db"
    db = build_database(task, cfg, root, device=resolve_device(cfg.device), progress=progress)
    return Prepared(cfg, task, db, db.tables(), _rtn_tables(db), root)


def allocate(prepared: Prepared, method: str, budget_bits: float) -> CompressionPlan:
    """A plan from one of the non-RL methods: 'uniform', 'dp' or 'rtn'.

    Raises:
        InfeasibleBudgetError: the budget is below what the method can reach.
    """
    cost = prepared.cfg.cost
    if method == "dp":
        return allocate_dp(prepared.tables, budget_bits, cost)
    if method == "uniform":
        return allocate_uniform(prepared.tables, budget_bits, cost)
    if method == "rtn":
        p = allocate_uniform(prepared.rtn_tables, budget_bits, cost, patterns=("dense",))
        return CompressionPlan(p.layers, meta={**dict(p.meta), "method": "rtn"})
    raise ConfigError(f"method must be one of {METHODS}, found {method!r}")


def stitched_model(prepared: Prepared, plan: CompressionPlan) -> nn.Module:
    """The plan applied to a copy of the model, with the configured statistics corrections."""
    model = stitch(prepared.task.model, prepared.db, plan)
    return correct(prepared.task.model, model, prepared.task, plan, prepared.cfg.eval,
                   prepared.dense_stats())


def evaluate_plan(prepared: Prepared, plan: CompressionPlan) -> float:
    """Held-out metric of the stitched, corrected model (higher is better)."""
    return metric(stitched_model(prepared, plan), prepared.task)


def plan_report(prepared: Prepared, plan: CompressionPlan) -> dict[str, float] | None:
    """The task's secondary held-out metrics of the stitched, corrected model (None if the task
    has none)."""
    if prepared.task.report is None:
        return None
    return {k: float(v) for k, v in prepared.task.report(stitched_model(prepared, plan)).items()}


def _layer_rows(prepared: Prepared, plan: CompressionPlan) -> list[dict[str, Any]]:
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
    prepared: Prepared, plan: CompressionPlan, method: str, metric_value: float,
    wall_seconds: float,
) -> dict[str, Any]:
    """The results.json content (DESIGN.md §3 keys)."""
    cfg = prepared.cfg
    tables = prepared.tables_for(plan)
    n_params = sum(p.numel() for p in prepared.task.model.parameters())
    compressible = sum(t.info.numel for t in tables)
    bits = plan_bits(plan, tables, cfg.cost) + 32.0 * (n_params - compressible)
    size_bytes = bits / 8.0
    return {
        "method": method,
        "metric_name": prepared.task.metric_name,
        "metric_dense": prepared.dense_metric(),
        "metric": float(metric_value),
        "budget_bits": float(plan.meta.get("budget_bits", cfg.env.budget_bits)),
        "avg_bits": plan_avg_bits(plan, tables, cfg.cost),
        "size_bytes": size_bytes,
        "compression_ratio": 4.0 * n_params / size_bytes if size_bytes > 0 else float("inf"),
        "proxy_error": plan_error(plan, tables),
        "wall_seconds": float(wall_seconds),
        "layers": _layer_rows(prepared, plan),
    }


def write_run(
    out_dir: str | Path,
    cfg: Config,
    prepared: Prepared,
    plan: CompressionPlan,
    method: str,
    metric: float,
    wall_seconds: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write config.yaml, plan.json and results.json atomically; return the results.

    ``extra`` entries are appended after the stable keys (never replacing them).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    plan.save(out / "plan.json")
    res = results_dict(prepared, plan, method, metric, wall_seconds)
    report = plan_report(prepared, plan)
    if report is not None:
        res["metrics"] = report
    for k, v in (extra or {}).items():
        res.setdefault(k, v)
    atomic_write_json(out / "results.json", res)
    return res


def _print_summary(res: Mapping[str, Any], out: Path) -> None:
    print(
        f"{res['method']}: {res['metric_name']} {res['metric']:.4f} (dense "
        f"{res['metric_dense']:.4f}), avg_bits {res['avg_bits']:.3f} (budget "
        f"{res['budget_bits']:g}), {res['compression_ratio']:.2f}x smaller, proxy error "
        f"{res['proxy_error']:.4g}, {res['wall_seconds']:.1f} s -> {out}"
    )


# ---------------------------------------------------------------------------------------------
# CLI entry points (each returns an exit code)


def run_build_db(cfg: Config, out: Path) -> int:
    """``automl-compress build-db``."""
    t0 = time.perf_counter()
    prepared = prepare(cfg, out)
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out) / "config.yaml", dump_config(cfg))
    n = sum(t.info.numel for t in prepared.tables)
    print(
        f"layer database: {len(prepared.tables)} layers, {n} compressible weights, menu bits "
        f"{list(cfg.menu.bits)} x patterns {list(cfg.menu.patterns)}, "
        f"{time.perf_counter() - t0:.1f} s -> {prepared.db_dir}"
    )
    return 0


def run_compress(cfg: Config, method: str, out: Path) -> int:
    """``automl-compress compress``: allocate, evaluate, write the run directory."""
    t0 = time.perf_counter()
    prepared = prepare(cfg, out)
    plan = allocate(prepared, method, cfg.env.budget_bits)
    value = evaluate_plan(prepared, plan)
    res = write_run(out, cfg, prepared, plan, method, value, time.perf_counter() - t0)
    _print_summary(res, Path(out))
    return 0


def _load_run(run_dir: Path, device: str | None = None) -> tuple[Config, CompressionPlan]:
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


def run_evaluate(run_dir: Path, device: str | None = None) -> int:
    """``automl-compress evaluate RUN``: re-score the run's plan; update results.json."""
    t0 = time.perf_counter()
    cfg, plan = _load_run(run_dir, device)
    prepared = prepare(cfg, run_dir)
    value = evaluate_plan(prepared, plan)
    path = Path(run_dir) / "results.json"
    if path.is_file():
        res = json.loads(path.read_text())
        res["metric"] = value
        res["metric_dense"] = prepared.dense_metric()
        report = plan_report(prepared, plan)
        if report is not None:
            res["metrics"] = report
        atomic_write_json(path, res)
    else:
        method = str(plan.meta.get("method", "unknown"))
        res = write_run(run_dir, cfg, prepared, plan, method, value, time.perf_counter() - t0)
    _print_summary(res, Path(run_dir))
    return 0


EXPORT_FORMATS = ("packed", "state_dict")


def run_export(run_dir: Path, fmt: str = "packed", out: Path | None = None) -> int:
    """``automl-compress export RUN [--format F] [--out PATH]``: write the compressed model and
    check that it reloads with the stitched model's outputs.

    ``packed`` writes ``RUN/compressed.safetensors`` (packed integers, docs/export.md) and prints
    its size beside results.json's ``size_bytes``; ``state_dict`` writes ``RUN/state_dict.pt``, the
    dequantised float state dict of the user's own module classes.
    """
    import copy

    from automl_compress.attention import fuse_attention
    from automl_compress.export import export_compressed, export_state_dict, load_compressed

    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"export format must be one of {EXPORT_FORMATS}, found {fmt!r}")
    cfg, plan = _load_run(run_dir)
    prepared = prepare(cfg, run_dir)
    model = stitched_model(prepared, plan)
    if fmt == "state_dict":
        path = Path(out) if out is not None else Path(run_dir) / "state_dict.pt"
        n_bytes = export_state_dict(path, model)
        reloaded = copy.deepcopy(fuse_attention(prepared.task.model))
        reloaded.load_state_dict(torch.load(path, weights_only=True))
        reloaded.eval()
        summary = f"exported {path} ({n_bytes} bytes, float state dict of the model's own classes)"
    else:
        path = Path(out) if out is not None else Path(run_dir) / "compressed.safetensors"
        sizes = export_compressed(path, model, prepared.db, plan, cost=cfg.cost)
        reloaded = load_compressed(path, prepared.task)
        summary = (
            f"exported {path} ({sizes['file_bytes']} bytes = header {sizes['header_bytes']} + "
            f"payload {sizes['payload_bytes']}; packed weights {sizes['packed_weight_bytes']})"
        )
        res_path = Path(run_dir) / "results.json"
        if res_path.is_file():
            counted = float(json.loads(res_path.read_text())["size_bytes"])
            summary += (f"; results.json size_bytes {counted:.0f}, payload / size_bytes "
                        f"{sizes['payload_bytes'] / counted:.3f}")
    batch = prepared.task.calib[0]
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the same attention kernels on both sides
    try:
        with torch.no_grad():
            a = prepared.task.forward(model, batch)
            b = prepared.task.forward(reloaded, batch)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    same = _same_outputs(a, b)
    print(f"{summary}; reloaded outputs identical: {same}")
    if not same:
        print("automl-compress: error: the reloaded model's outputs differ", file=sys.stderr)
        return 1
    return 0


def _same_outputs(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6))
    if isinstance(a, Mapping):
        return all(_same_outputs(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return all(_same_outputs(x, y) for x, y in zip(a, b, strict=True))
    return a == b
