"""Statistics corrections chosen on validation against chosen on calibration fidelity.

For each config and budget: the DP plan (under the objective ``alloc.objective = auto`` chooses
at that budget, with validation-chosen corrections, as ``compress --method dp`` runs) scored
under every correction choice (bias correction on/off × the BatchNorm modes that apply) on the
validation split, on the test split, and by the outputs' fidelity to the dense model on the
calibration batches (``eval.corrections = calibration``: no labels, no validation evaluation).
Marks the choice each rule makes (the first maximum, the configured corrections first) and
prints, per (task, budget), the test metric of both choices.

Usage (databases reused from ``--db`` when given, else built under WORK/db-<config>)::

    PYTHONPATH=tests python bench/corrections.py --config configs/user_model.yaml --budgets 4 3 2.5
    python bench/corrections.py --config configs/digits.yaml --budgets 2 1.5 1.25 1
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from automl_compress import pipeline, selection
from automl_compress.config import load_config


def rows_at(prepared: pipeline.Prepared, budget: float) -> tuple[str, list[dict]]:
    """The chosen objective and one row per correction choice of the DP plan at ``budget``."""
    base = prepared.cfg
    prepared.cfg = dataclasses.replace(base, env=dataclasses.replace(base.env,
                                                                     budget_bits=budget))
    chosen = selection.calibrate(prepared, "dp", budget)["objective"]["name"]
    # the configured corrections first, as calibrate orders them (its first maximum on ties)
    prepared.cfg = dataclasses.replace(prepared.cfg, eval=base.eval)
    plan = pipeline.allocate(prepared, "dp", budget)
    rows = []
    for c in selection.correction_choices(prepared):
        rows.append({"corrections": selection._label(c),
                     "val": pipeline.validate_plan(prepared, plan, 1.0, c),
                     "test": pipeline.metric(pipeline.stitched_model(prepared, plan, c),
                                             prepared.task),
                     "fidelity": pipeline.calibration_fidelity(prepared, plan, c)})
    prepared.cfg = base
    return chosen, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--budgets", type=float, nargs="+", required=True)
    ap.add_argument("--db", default=None, help="an existing database folder of this config")
    ap.add_argument("--work", default="bench_out/corrections")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.overrides)
    work = Path(args.work)
    db = Path(args.db) if args.db else work / f"db-{Path(args.config).stem}"
    prepared = pipeline.prepare(cfg, work, db_dir=db, progress=False)
    summary = []
    print(f"{cfg.task.name}: dense {prepared.dense_metric():.4f} test / "
          f"{prepared.dense_val():.4f} val\n")
    print("| budget | objective | corrections | val | test | calibration fidelity | chosen by |")
    print("|---:|---|---|---:|---:|---:|---|")
    for b in args.budgets:
        objective, rows = rows_at(prepared, b)
        by_val = max(rows, key=lambda r: r["val"])
        by_fid = max(rows, key=lambda r: r["fidelity"])
        for r in rows:
            marks = [m for m, pick in (("validation", by_val), ("calibration", by_fid))
                     if r is pick]
            print(f"| {b:g} | {objective} | {r['corrections']} | {r['val']:.4f} | "
                  f"{r['test']:.4f} | {r['fidelity']:.6f} | {', '.join(marks)} |")
        summary.append((b, by_val["test"], by_fid["test"]))
        sys.stdout.flush()
    print("\n| budget | test, chosen on validation | test, chosen on calibration fidelity |")
    print("|---:|---:|---:|")
    for b, v, f in summary:
        print(f"| {b:g} | {v:.4f} | {f:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
