"""Zero-shot plans between the budgets a range policy trained at: where the rollout starts.

A ``train --budget-range`` policy has incumbents (the best plans its run found) at the budgets it
trained at. At a budget between them it has none of its own; ``apply`` then starts the rollout
from the incumbent of the nearest lower budget that has one, re-planned by the DP at the new
budget (``Anchors.lend``). This bench trains one range policy per seed as ``bench/search.py
--range`` does (the same config and seed) and scores, at every midpoint between two training
budgets, three zero-evaluation plans on the test and validation splits:

- ``lent``: the rollout from the lent incumbent (what ``apply`` returns);
- ``dp-start``: the rollout from the DP plan (what ``apply`` returned before the lending);
- ``dp``: the calibrated DP plan itself, under the same objective and corrections;

and, from those rows, ``checked``: the better of ``lent`` and ``dp`` on validation (``apply
--check-dp``, 2 evaluations; a tie keeps the policy's plan).

Results are resumed per seed from OUT/between_<task>.json.

Run:  PYTHONPATH=tests python bench/range_between.py --config configs/user_model.yaml \\
          --set alloc.objective=normalized --range 2.5 4 --seeds 0 1 2 3 4 --out OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# bench/search.py's helpers (bench/ is on sys.path when run)
from search import _row, _with, lent_start, train_range

from automl_compress import pipeline
from automl_compress.config import load_config
from automl_compress.io import atomic_write_json

STARTS = ("lent", "dp-start", "dp")
COLUMNS = (*STARTS, "checked")


def checked(row: dict[str, Any]) -> dict[str, Any]:
    """The plan ``apply --check-dp`` keeps: the lent rollout unless dp scores higher on val."""
    return row["dp"] if row["dp"]["metric_val"] > row["lent"]["metric_val"] else row["lent"]


def seed_rows(prepared: pipeline.Prepared, lo: float, hi: float, seed: int,
              evaluations: int) -> dict[str, Any]:
    """Train seed ``seed``'s range policy; its three plans at every midpoint of its grid."""
    base = prepared.cfg
    _, search, chosen = train_range(prepared, lo, hi, seed, "rl-coef", evaluations)
    trained = chosen.env.budgets()
    rows: dict[str, Any] = {}
    try:
        for a, b in zip(trained, trained[1:], strict=False):
            at = round((a + b) / 2, 6)
            prepared.cfg = _with(chosen, at, seed, {"budget_range": (lo, hi)})
            t0 = time.perf_counter()
            plans = {"dp-start": search.rollout(True, at, measure=False).plan,
                     "dp": search.dp_plan(at)}
            with lent_start(search, at, trained) as lent:
                plans["lent"] = search.rollout(True, at, measure=False).plan
            rows[f"{at:g}"] = {k: _row(prepared, p, {"evaluations": 0.0}, t0)
                               for k, p in plans.items()}
            rows[f"{at:g}"]["lent_from"] = lent
    finally:
        search.close()
        prepared.cfg = base
    return rows


def table(result: dict[str, Any]) -> str:
    """Markdown: per midpoint, each column's test mean ± std over seeds (validation mean), and
    lent − dp-start per seed in test points; then the mean over the midpoints."""
    seeds = sorted(result["seeds"], key=int)
    budgets = sorted(result["seeds"][seeds[0]], key=float)
    lines = [f"seeds {', '.join(seeds)}", "",
             "| budget | " + " | ".join(f"{s} test (val)" for s in COLUMNS)
             + " | lent − dp-start, per seed (test pt) | lent from |",
             "|---:|" + "---:|" * len(COLUMNS) + "---|---|"]
    means: dict[str, list[tuple[float, float]]] = {s: [] for s in COLUMNS}
    for b in budgets:
        rs = [dict(r, checked=checked(r)) for r in (result["seeds"][x][b] for x in seeds)]
        cells = []
        for s in COLUMNS:
            t = [r[s]["metric"] for r in rs]
            v = statistics.fmean(r[s]["metric_val"] for r in rs)
            means[s].append((statistics.fmean(t), v))
            sd = statistics.stdev(t) if len(t) > 1 else 0.0
            cells.append(f"{statistics.fmean(t):.4f} ± {sd:.4f} ({v:.4f})")
        diff = " / ".join(f"{100 * (r['lent']['metric'] - r['dp-start']['metric']):+.2f}"
                          for r in rs)
        src = " / ".join("–" if r["lent_from"] is None else f"{r['lent_from']:g}" for r in rs)
        lines.append(f"| {b} | " + " | ".join(cells) + f" | {diff} | {src} |")
    cells = [f"{statistics.fmean(t for t, _ in means[s]):.4f} "
             f"({statistics.fmean(v for _, v in means[s]):.4f})" for s in COLUMNS]
    gain = 100 * (statistics.fmean(t for t, _ in means["lent"])
                  - statistics.fmean(t for t, _ in means["dp-start"]))
    lines.append("| mean | " + " | ".join(cells) + f" | {gain:+.2f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--range", type=float, nargs=2, required=True, metavar=("LOW", "HIGH"))
    ap.add_argument("--evaluations", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, args.overrides)
    path = out / f"between_{cfg.task.name}.json"
    result = json.loads(path.read_text()) if path.is_file() else {"seeds": {}}
    prepared = pipeline.prepare(cfg, out, db_dir=out / f"db_{cfg.task.name}", progress=False)
    for s in args.seeds:
        if str(s) not in result["seeds"]:
            result["seeds"][str(s)] = seed_rows(prepared, *args.range, s, args.evaluations)
            atomic_write_json(path, result)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
