"""Transfer benchmark: a policy trained on one model, applied to a sibling.

Per seed: ``train`` on the source model with E evaluations (the default form, the coefficient
hierarchy), then on the target model, all at the same budget:

- ``zero-shot``: one deterministic rollout of the source policy (no evaluation spent);
- ``zero-shot-checked``: the same rollout scored against the calibrated DP plan on validation,
  the better kept (``apply --check-dp``: 2 evaluations, 1 when they are the same plan);
- ``fine-tuned``: the source policy trained further with F = ``--finetune-share`` × E
  evaluations (10 % by default; the objective and correction choice and the final candidates
  included);
- ``fresh``: a new policy trained on the target with the same F evaluations;
- ``evo``: the EvoPress-style search with the same F evaluations;
- ``dp``: the calibrated DP (spends only its objective and correction choice; per seed, since
  the fisher objective's probes follow the seed).

Selection on the validation split, reported on the test split. A learned run also stops after
``STEPS_PER_EVALUATION`` env steps per evaluation of its budget (a policy repeating scored
plans spends nothing), as in bench/search.py.

``--methods`` runs a subset of the target rows (the source's dp and training run whenever a row
applies its policy).

Usage (databases under OUT/db_<task>, results resumed from OUT/transfer_<src>_<tgt>.json)::

    python bench/transfer.py --source configs/digits.yaml --target configs/digits_wide.yaml \\
        --budget 1 --evaluations 256 --out bench_out/transfer
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# the search bench's row, seeding, scoring and aggregation (bench/ is on sys.path when run)
from search import STEPS_PER_EVALUATION, _agg, _row, _with, non_learned

from automl_compress import pipeline
from automl_compress.agents import run as agent_run
from automl_compress.config import Config, load_config
from automl_compress.io import atomic_write_json

METHODS = ("zero-shot", "zero-shot-checked", "fine-tuned", "fresh", "evo", "dp")


def _train(prepared: pipeline.Prepared, cfg: Config, policy_dir: Path,
           evaluations: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    prepared.cfg = cfg
    tr = agent_run.start_training(prepared, policy_dir, int(STEPS_PER_EVALUATION * evaluations),
                                  evaluations)
    res = tr.run(None, progress=False)
    return _row(prepared, res.plan, res.selection, t0, {"env_steps": res.steps})


def _apply(prepared: pipeline.Prepared, cfg: Config, policy_dir: Path,
           evaluations: float | None, check_dp: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    steps = 0 if evaluations is None else int(STEPS_PER_EVALUATION * evaluations)
    source = agent_run.open_policy(cfg, policy_dir, steps, evaluations, check_dp)
    prepared.cfg = source.cfg
    res = agent_run.apply_policy(prepared, source, steps, evaluations, progress=False)
    return _row(prepared, res.plan, res.selection, t0, {"env_steps": res.steps})


def bench(src_cfg: Config, tgt_cfg: Config, out: Path, budget: float, evaluations: int,
          share: float, seeds: list[int], methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """Run (or resume) the rows of ``methods``; return the results dict written to OUT.

    The source rows run whenever a method applies the source's policy.
    """
    name = f"transfer_{src_cfg.task.name}_{tgt_cfg.task.name}.json"
    path = out / name
    result = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    src = pipeline.prepare(src_cfg, out, db_dir=out / f"db_{src_cfg.task.name}", progress=False)
    tgt = pipeline.prepare(tgt_cfg, out, db_dir=out / f"db_{tgt_cfg.task.name}", progress=False)
    src_base, tgt_base = src.cfg, tgt.cfg
    ft = max(1.0, round(share * evaluations))
    result.update({"source": src_cfg.task.name, "target": tgt_cfg.task.name, "budget": budget,
                   "evaluations": evaluations, "finetune_evaluations": ft,
                   "metric_name": tgt.task.metric_name, "dense": tgt.dense_metric(),
                   "dense_val": tgt.dense_val(), "source_dense": src.dense_metric()})

    policy = bool({"zero-shot", "zero-shot-checked", "fine-tuned"} & set(methods))

    def once(label: str, fn, *args) -> None:
        method = label.split("/")[0]
        wanted = method in methods or (policy and method in ("source", "source-dp"))
        if label in result["runs"] or not wanted:
            return
        row = fn(*args)
        result["runs"][label] = row
        atomic_write_json(path, result)
        print(f"{label}: test {row['metric']:.4f} val {row['metric_val']:.4f} "
              f"({row['evaluations']:.0f} evaluations, {row['wall_seconds']:.0f} s)", flush=True)

    for s in seeds:
        pol = out / f"policy_{src_cfg.task.name}_{s}"
        tc = _with(tgt_base, budget, s)
        # dp per seed: with alloc.objective=auto the fisher candidate's probes follow the seed
        once(f"dp/{s}", non_learned, tgt, tc, "dp", None)
        once(f"source-dp/{s}", non_learned, src, _with(src_base, budget, s), "dp", None)
        once(f"source/{s}", _train, src, _with(src_base, budget, s), pol, float(evaluations))
        once(f"zero-shot/{s}", _apply, tgt, tc, pol, None)
        once(f"zero-shot-checked/{s}", _apply, tgt, tc, pol, None, True)
        once(f"fine-tuned/{s}", _apply, tgt, tc, pol, ft)
        once(f"fresh/{s}", _train, tgt, tc, out / f"fresh_{tgt_cfg.task.name}_{s}", ft)
        once(f"evo/{s}", non_learned, tgt, tc, "evo", ft)
    src.cfg, tgt.cfg = src_base, tgt_base
    return result


def table(result: dict[str, Any]) -> str:
    """Markdown: one row per method, mean ± std over seeds (test, validation, evaluations)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for label, row in result["runs"].items():
        groups.setdefault(label.split("/")[0], []).append(row)
    lines = [f"{result['source']} → {result['target']} at {result['budget']:g} bits "
             f"({result['metric_name']}; target dense {result['dense']:.4f} test / "
             f"{result['dense_val']:.4f} val; source trained with {result['evaluations']} "
             f"evaluations, fine-tune / fresh / evo with {result['finetune_evaluations']:g})", "",
             "| method | test (mean ± std) | per seed | val (mean ± std) | evaluations | wall s |",
             "|---|---:|---|---:|---:|---:|"]
    for m in ("source-dp", "source", *METHODS):
        rows = groups.get(m)
        if not rows:
            continue
        a = _agg(rows)
        seeds = " / ".join(f"{r['metric']:.4f}" for r in rows) if len(rows) > 1 else ""
        lines.append(f"| {m} | {a['metric']:.4f} ± {a['metric_std']:.4f} | {seeds} | "
                     f"{a['metric_val']:.4f} ± {a['metric_val_std']:.4f} | "
                     f"{a['evaluations']:.0f} | {a['wall_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="configs/digits.yaml")
    ap.add_argument("--target", default="configs/digits_wide.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="override applied to both configs")
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--evaluations", type=int, default=256)
    ap.add_argument("--finetune-share", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="bench_out/transfer")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                    help="the target rows to run (default: all)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = bench(load_config(args.source, args.overrides), load_config(args.target, args.overrides),
                out, args.budget, args.evaluations, args.finetune_share, args.seeds,
                tuple(args.methods))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
