"""Re-measure the plans of ``bench/search.py`` on held-out data that no search has seen.

The learned rows of ``bench/search.py`` are the best of many plans measured on the held-out split
that the table reports, a selection bias the non-RL allocators (which never look at the metric)
do not have. This script prints, per saved plan, the metric on the reported held-out split next
to the same metric on a fresh split that neither the Hessians nor any plan selection touched:

- minilm_l6: MiniLM's reference text has 998 sentences; the task takes ``eval_samples`` held-out
  and ``calib_samples`` calibration sentences from one seeded permutation, so the rest of that
  permutation is the fresh split (mean cosine, and top-1 retrieval agreement).
- crepe_tiny / crepe_full: the tones are synthetic, so the fresh split is the held-out stream of
  the task seed + 1 (raw pitch accuracy).

Usage (after ``bench/search.py --config C ...`` wrote OUT/plans/):

    python bench/fresh_split.py --config configs/minilm.yaml --out bench_out/search
    python bench/fresh_split.py --config configs/crepe_tiny.yaml --out bench_out/search
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from automl_compress import pipeline
from automl_compress.config import load_config
from automl_compress.plan import CompressionPlan
from automl_compress.zoo import minilm
from automl_compress.zoo.registry import load_task

FRESH_SEED_TASKS = ("crepe_tiny", "crepe_full")


def fresh_fidelity(prepared: pipeline.Prepared, options: dict) -> minilm.EmbeddingFidelity:
    """The embedding-fidelity metric on the sentences the task left out of both of its splits."""
    defaults = {k: p.default for k, p in inspect.signature(minilm.minilm_l6).parameters.items()}
    opts = {**defaults, **options}
    used = opts["eval_samples"] + opts["calib_samples"]
    sentences = minilm.reference_sentences()
    order = np.random.default_rng(opts["seed"]).permutation(len(sentences))
    fresh = [sentences[i] for i in order[used:]]
    if len(fresh) < 2:
        raise SystemExit(f"only {len(fresh)} unused sentences; lower eval/calib samples")
    _, tokenizer = minilm.load_minilm()
    return minilm.EmbeddingFidelity(*minilm._batches(tokenizer, fresh, opts["batch_size"]),
                                    prepared.task.model)


def fresh_metric(prepared: pipeline.Prepared) -> tuple[str, Callable]:
    """A description of the fresh split and ``model -> {column: value}`` on it."""
    task = prepared.cfg.task
    if task.name == "minilm_l6":
        fid = fresh_fidelity(prepared, dict(task.options))
        n = sum(len(i) for i in fid.indices)
        return f"{n} unused sentences", fid.report
    if task.name in FRESH_SEED_TASKS:
        seed = int(task.options.get("seed", 0)) + 1
        other = load_task(dataclasses.replace(task, options={**task.options, "seed": seed}))
        return f"held-out tones of seed {seed}", lambda m: {other.metric_name: other.evaluate(m)}
    raise SystemExit(f"no fresh split defined for task {task.name!r}; supported: minilm_l6, "
                     f"{', '.join(FRESH_SEED_TASKS)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/minilm.yaml")
    ap.add_argument("--out", default="bench_out/search", help="the bench/search.py --out folder")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    out = Path(args.out)
    plans = sorted((out / "plans").glob(f"{cfg.task.name}_*.json"))
    if not plans:
        raise SystemExit(f"no plans under {out / 'plans'}; run bench/search.py --out {out} first")
    prepared = pipeline.prepare(cfg, out, db_dir=out / f"db_{cfg.task.name}", progress=False)
    what, fresh = fresh_metric(prepared)
    rows = [("dense", prepared.dense_metric(), fresh(prepared.task.model))]
    for path in plans:
        model = pipeline.stitched_model(prepared, CompressionPlan.load(path))
        rows.append((path.stem, float(prepared.task.evaluate(model)), fresh(model)))
    cols = list(rows[0][2])
    print(f"Fresh split: {what}.\n")
    print("| plan | held-out metric | " + " | ".join(f"fresh {c}" for c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for name, held, rep in rows:
        print(f"| {name} | {held:.4f} | " + " | ".join(f"{rep[c]:.4f}" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
