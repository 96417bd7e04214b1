"""Allocator benchmark: dense vs rtn vs uniform vs dp at several average-bit budgets.

For each config: build (or reuse) the layer database, then for every budget and method allocate a
plan, stitch it, apply the statistics corrections and measure the held-out metric. Prints one
markdown table per task: metric, avg_bits, proxy error (sum of table errors) and wall time of
allocation + evaluation (the database build time is printed once above the table).

Usage::

    python bench/allocators.py --config configs/digits.yaml --budgets 8 4 3 2.5
    python bench/allocators.py --config configs/crepe_tiny.yaml --config configs/minilm.yaml

Tasks whose optional packages are missing are reported and skipped.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from automl_compress.config import load_config
from automl_compress.errors import InfeasibleBudgetError, TaskError
from automl_compress.pipeline import allocate, evaluate_plan, plan_report, prepare, results_dict

METHODS = ("rtn", "uniform", "dp")


def bench_config(path: str, overrides: list[str], budgets: list[float], work: Path) -> None:
    cfg = load_config(path, overrides)
    t0 = time.perf_counter()
    try:
        prepared = prepare(cfg, work / "run", db_dir=work / f"db-{Path(path).stem}",
                           progress=False)
    except TaskError as exc:
        print(f"\n### {path}: skipped ({exc})")
        return
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    dense = prepared.dense_metric()
    dense_s = time.perf_counter() - t0
    n = sum(t.info.numel for t in prepared.tables)
    print(f"\n### {cfg.task.name} ({path}; solver quant={cfg.solver.quant}, "
          f"prune={cfg.solver.prune}; menu bits {list(cfg.menu.bits)} x patterns "
          f"{list(cfg.menu.patterns)})")
    print(f"{len(prepared.tables)} layers, {n} compressible weights; database build/load "
          f"{build:.1f} s; dense {prepared.task.metric_name} {dense:.4f} ({dense_s:.2f} s)\n")
    print("| budget | method | metric | avg_bits | proxy error | wall s |")
    print("|---:|---|---:|---:|---:|---:|")
    for budget in budgets:
        for method in METHODS:
            t0 = time.perf_counter()
            try:
                plan = allocate(prepared, method, budget)
            except InfeasibleBudgetError as exc:
                print(f"| {budget:g} | {method} | infeasible (min {exc.minimum:.3f}) | | | |")
                continue
            value = evaluate_plan(prepared, plan)
            wall = time.perf_counter() - t0
            res = results_dict(prepared, plan, method, value, wall)
            report = plan_report(prepared, plan)
            others = ", ".join(f"{k} {v:.4f}" for k, v in (report or {}).items())
            print(f"| {budget:g} | {method} | {value:.4f} | {res['avg_bits']:.3f} | "
                  f"{res['proxy_error']:.4g} | {wall:.2f} |" + (f" {others} |" if others else ""))
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", required=True, help="YAML config (repeatable)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="dotted override applied to every config")
    ap.add_argument("--budgets", type=float, nargs="+", default=[8.0, 4.0, 3.0, 2.5])
    ap.add_argument("--work", default=None, help="where databases are kept (default: a temp dir)")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, cuda {torch.cuda.is_available()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        for path in args.config:
            bench_config(path, args.overrides, args.budgets, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
