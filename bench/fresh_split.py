"""Re-measure the plans of ``bench/search.py`` for minilm_l6 on sentences no search has seen.

The learned rows of ``bench/search.py`` are the best of many plans measured on the held-out split
that the table reports, a selection bias the non-RL allocators (which never look at the metric)
do not have. MiniLM's reference text has 998 sentences; the task takes ``eval_samples`` held-out
and ``calib_samples`` calibration sentences from one seeded permutation, so the rest of that
permutation is a fresh split that neither the Hessians nor any plan selection touched. This
script prints, per saved plan, the metric on the reported held-out split next to the same metric
(mean cosine and top-1 retrieval agreement) on the fresh split.

Usage (after ``bench/search.py --config configs/minilm.yaml ...`` wrote OUT/plans/):

    python bench/fresh_split.py --config configs/minilm.yaml --out bench_out/search
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import numpy as np

from automl_compress import pipeline
from automl_compress.config import load_config
from automl_compress.plan import CompressionPlan
from automl_compress.zoo import minilm


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/minilm.yaml")
    ap.add_argument("--out", default="bench_out/search", help="the bench/search.py --out folder")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    if cfg.task.name != "minilm_l6":
        raise SystemExit(f"this check is for minilm_l6, found task {cfg.task.name!r}")
    out = Path(args.out)
    plans = sorted((out / "plans").glob(f"{cfg.task.name}_*.json"))
    if not plans:
        raise SystemExit(f"no plans under {out / 'plans'}; run bench/search.py --out {out} first")
    prepared = pipeline.prepare(cfg, out, db_dir=out / f"db_{cfg.task.name}", progress=False)
    fresh = fresh_fidelity(prepared, dict(cfg.task.options))
    n_fresh = sum(len(i) for i in fresh.indices)
    print(f"| plan | held-out cosine | fresh cosine ({n_fresh} sentences) | fresh retrieval top1 |")
    print("|---|---|---|---|")
    for path in plans:
        model = pipeline.stitched_model(prepared, CompressionPlan.load(path))
        held = float(prepared.task.evaluate(model))
        rep = fresh.report(model)
        print(f"| {path.stem} | {held:.4f} | {rep['cosine']:.4f} | {rep['retrieval_top1']:.4f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
