"""Allocator benchmark: rtn, uniform, dp under every objective, and the true-metric searches.

For each config and budget: ``rtn`` and ``uniform`` (one width everywhere), ``dp`` under each
calibrated objective (raw, normalized, fisher, loss, and ``auto``: the best of
``alloc.auto_objectives`` on the validation split), and the searches ``spdy`` and ``evo`` at each
evaluation budget (under the configured objective, ``--set alloc.objective=...``, warm-started from
its DP plan). Every method chooses its statistics corrections (and ``auto`` its objective) on the
validation split (counted in its evaluations), selects on the validation split only, and is
reported on the test split. Rows: the objective used, test metric, validation metric, avg_bits,
validation evaluations spent (full-pass equivalents), wall time (allocation or search +
evaluation; the database and objectives are built once per task and timed apart).

Usage (databases under WORK/db-<config>, results appended to WORK/<config>.json and resumed)::

    python bench/allocators.py --config configs/digits.yaml --budgets 2.5 2 --work bench_out/alloc
    PYTHONPATH=tests python bench/allocators.py --config configs/user_model.yaml --budgets 4 3

Tasks whose optional packages are missing are reported and skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

from automl_compress import pipeline, selection
from automl_compress.commands import rundir
from automl_compress.config import AUTO, load_config
from automl_compress.errors import InfeasibleBudgetError, TaskError
from automl_compress.io import atomic_write_json
from automl_compress.objectives import OBJECTIVE_VERSION, ObjectiveName, describe

OBJECTIVES = [o.value for o in ObjectiveName]


def _row(prepared: pipeline.Prepared, method: str, budget: float, evaluations: float | None,
         label: str) -> dict:
    t0 = time.perf_counter()
    plan, sel = selection.compress(prepared, method, budget, evaluations)
    test = pipeline.evaluate_plan(prepared, plan)
    wall = time.perf_counter() - t0
    res = rundir.results_dict(prepared, plan, method, test, wall, sel)
    report = pipeline.plan_report(prepared, plan)
    return {"label": label, "budget": budget, "method": method, "objective": res["objective"],
            "metric": test, "metric_val": res["metric_val"], "avg_bits": res["avg_bits"],
            "evaluations": res["evaluations"], "corrections": res["corrections"],
            "wall_seconds": wall, "metrics": report,
            "start_val": sel.get("start_val")}


def _jobs(budgets: list[float], methods: list[str], evaluations: list[int],
          default: str) -> list[tuple[float, str, int | None, str, str]]:
    """(budget, method, evaluations, objective, label) of every row, in table order."""
    jobs: list[tuple[float, str, int | None, str, str]] = []
    for budget in budgets:
        jobs += [(budget, m, None, default, f"{budget:g}/{m}") for m in ("rtn", "uniform")
                 if m in methods]
        if "dp" in methods:
            jobs += [(budget, "dp", None, name, f"{budget:g}/dp-{name}")
                     for name in (*OBJECTIVES, AUTO)]
        jobs += [(budget, m, e, default, f"{budget:g}/{m}-{e}/{default}")
                 for m in ("spdy", "evo") if m in methods for e in evaluations]
    return jobs


def bench_config(path: str, overrides: list[str], budgets: list[float], evaluations: list[int],
                 work: Path, methods: list[str]) -> None:
    cfg = load_config(path, overrides)
    stem = Path(path).stem
    out_json = work / f"{stem}.json"
    done = json.loads(out_json.read_text()) if out_json.is_file() else {"rows": []}
    t0 = time.perf_counter()
    try:
        prepared = pipeline.prepare(cfg, work / "run", db_dir=work / f"db-{stem}",
                                    progress=False)
    except TaskError as exc:
        print(f"\n### {path}: skipped ({exc})")
        return
    build = time.perf_counter() - t0
    objectives = {}
    for name in OBJECTIVES:
        t1 = time.perf_counter()
        objectives[name] = pipeline.load_objective(prepared, name, progress=False)
        objectives[name].cost.setdefault("seconds", time.perf_counter() - t1)
    default = cfg.alloc.objective
    base_cfg = prepared.cfg
    n = sum(t.info.numel for t in prepared.raw_tables)
    done.update({"task": cfg.task.name, "config": path, "layers": len(prepared.raw_tables),
                 "weights": n, "build_seconds": build, "dense": prepared.dense_metric(),
                 "dense_val": prepared.dense_val(), "metric_name": prepared.task.metric_name,
                 "objective_version": OBJECTIVE_VERSION,
                 "objectives": {k: dict(v.cost) for k, v in objectives.items()}})
    print(f"\n### {cfg.task.name} ({path}; solver quant={cfg.solver.quant}, "
          f"prune={cfg.solver.prune}; menu bits {list(cfg.menu.bits)} x patterns "
          f"{list(cfg.menu.patterns)}; default objective {default})")
    print(f"{len(prepared.raw_tables)} layers, {n} compressible weights; database build/load "
          f"{build:.1f} s; dense {prepared.task.metric_name} {prepared.dense_metric():.4f} test / "
          f"{prepared.dense_val():.4f} val")
    for obj in objectives.values():
        print(f"- {describe(obj)}")
    print("\n| budget | method | objective | test | val | avg_bits | evaluations | corrections "
          "| wall s |")
    print("|---:|---|---|---:|---:|---:|---:|---|---:|")
    have = {r["label"]: r for r in done["rows"]}
    for budget, method, evals, obj_name, label in _jobs(budgets, methods, evaluations, default):
        row = have.get(label)
        if row is None:
            prepared.cfg = dataclasses.replace(
                base_cfg, alloc=dataclasses.replace(base_cfg.alloc, objective=obj_name))
            prepared.set_objective(objectives[obj_name if obj_name != AUTO
                                              else base_cfg.alloc.auto_objectives[0]])
            try:
                row = _row(prepared, method, budget, evals, label)
            except InfeasibleBudgetError as exc:
                row = {"label": label, "budget": budget, "method": method,
                       "infeasible": exc.minimum}
            done["rows"].append(row)
            atomic_write_json(out_json, done)
        name = label.split("/", 1)[1].removesuffix(f"/{default}")
        if "infeasible" in row:
            print(f"| {budget:g} | {name} | | infeasible (min {row['infeasible']:.3f}) | | | | | |")
            continue
        c = row["corrections"]
        corr = f"{'bias' if c['bias_correction'] else 'no bias'}, BN {c['bn_reestimate']}"
        others = ", ".join(f"{k} {v:.4f}" for k, v in (row.get("metrics") or {}).items())
        print(f"| {budget:g} | {name} | {row['objective']} | {row['metric']:.4f} | "
              f"{row['metric_val']:.4f} | "
              f"{row['avg_bits']:.3f} | {row['evaluations']:.0f} | {corr} | "
              f"{row['wall_seconds']:.1f} |" + (f" {others} |" if others else ""))
        sys.stdout.flush()
    prepared.cfg = base_cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", required=True, help="YAML config (repeatable)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="dotted override applied to every config")
    ap.add_argument("--budgets", type=float, nargs="+", default=[4.0, 3.0, 2.5])
    ap.add_argument("--evaluations", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--methods", nargs="+", default=["rtn", "uniform", "dp", "spdy", "evo"])
    ap.add_argument("--work", default="bench_out/allocators", help="databases and JSON results")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, cuda {torch.cuda.is_available()}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for path in args.config:
        bench_config(path, args.overrides, args.budgets, args.evaluations, work, args.methods)
    return 0


if __name__ == "__main__":
    sys.exit(main())
