"""What varies a `train` result: the seed and the thread count, each run twice.

Runs ``automl-compress train`` as a user would (one process per run, ``OMP_NUM_THREADS`` set
before torch starts), every (seed, threads) pair ``--repeats`` times, all on one shared database,
and reports per run the test and validation metric and a hash of the plan. Same seed and thread
count must give the same plan (the reproducibility contract); what differs across thread counts
is float reduction order in the model's forward passes and the controllers' updates.

Usage::

    python bench/variance.py --config configs/digits.yaml --budget 1 --evaluations 64 \\
        --seeds 0 1 --threads 1 2 --out bench_out/variance
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from automl_compress.io import atomic_write_json


def _plan_hash(run: Path) -> str:
    layers = json.loads((run / "plan.json").read_text())["layers"]
    return hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()[:12]


def one_run(config: str, budget: float, evaluations: int, seed: int, threads: int, run: Path,
            db: Path, overrides: list[str]) -> dict:
    """One ``train`` process on the shared database; its metrics, plan hash and wall time."""
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "db").exists():
        (run / "db").symlink_to(db.resolve(), target_is_directory=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cli = Path(sys.executable).with_name("automl-compress")
    cmd = [str(cli), "train", "--config", config, "--budget-bits", f"{budget:g}",
           "--evaluations", str(evaluations), "--seed", str(seed), "--out", str(run)]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    with open(run / "train.log", "w") as log:  # the progress bar and any error go here
        subprocess.run(cmd, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
    res = json.loads((run / "results.json").read_text())
    return {"seed": seed, "threads": threads, "metric": res["metric"],
            "metric_val": res["metric_val"], "evaluations": res["evaluations"],
            "plan": _plan_hash(run), "wall_seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--evaluations", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--db", default=None, help="a built database folder to share (default: "
                    "OUT/db, built by the first run)")
    ap.add_argument("--out", default="bench_out/variance")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    db = Path(args.db) if args.db else out / "db"
    db.mkdir(parents=True, exist_ok=True)
    path = out / "variance.json"
    result = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    for seed in args.seeds:
        for threads in args.threads:
            for r in range(args.repeats):
                label = f"{seed}/{threads}/{r}"
                if label not in result["runs"]:
                    result["runs"][label] = one_run(
                        args.config, args.budget, args.evaluations, seed, threads,
                        out / f"run_s{seed}_t{threads}_r{r}", db, args.overrides)
                    atomic_write_json(path, result)
                row = result["runs"][label]
                print(f"seed {seed} threads {threads} run {r}: test {row['metric']:.4f} val "
                      f"{row['metric_val']:.4f} plan {row['plan']} ({row['wall_seconds']:.0f} s)",
                      flush=True)
    same = {}
    for row in result["runs"].values():
        same.setdefault((row["seed"], row["threads"]), set()).add(row["plan"])
    for (seed, threads), plans in sorted(same.items()):
        print(f"seed {seed} threads {threads}: {'same plan' if len(plans) == 1 else 'DIFFERENT'}"
              f" over the repeats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
