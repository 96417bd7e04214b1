"""Serial vs Ray: the layer database build and the searches' true-metric evaluations
(docs/distributed.md, docs/benchmarks.md "Distributed").

Parts (``--parts``):

- ``build``: each ``--configs`` database built from scratch serially (``executor.kind=local``),
  then on a local Ray with ``--workers`` CPUs; wall times (Hessian capture included, Ray's start
  excluded and reported apart), the per-layer times of the serial build, and a check that both
  databases hold identical tables.
- ``search``: ``evo`` on the first config's database with ``--evaluations`` validation passes,
  scored locally, then by 1 and by 2 Ray evaluation actors; validation passes (full-pass
  equivalents) and metric calls per minute, and a check that every run found the same plan with the
  same counts.
- ``estimate``: on paper, the wall time of a ResNet-50 and of a 7B-parameter LLM database on 8 GPUs,
  from the per-layer H100 times of bench/solvers.py's references (printed with the arithmetic).

Run (results in ``--out``/results.json; the machine's load is recorded with each part)::

    OMP_NUM_THREADS=1 python bench/distributed.py --configs configs/digits.yaml
    OMP_NUM_THREADS=1 python bench/distributed.py --configs configs/crepe_tiny.yaml --parts build
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from automl_compress import pipeline, selection
from automl_compress.config import Config, ExecutorConfig, load_config
from automl_compress.database.allocate import allocate_dp
from automl_compress.database.build import build_database
from automl_compress.io import atomic_write_json
from automl_compress.search import evo_search
from automl_compress.zoo import load_task
from automl_compress.zoo.base import with_validation


def load() -> str:
    """The machine's ``uptime`` line (its load averages)."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def start_ray(workers: int) -> float:
    """Start a local Ray with ``workers`` CPUs; the seconds it took."""
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1",
                                       "PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    return time.perf_counter() - t0


def timed_build(cfg: Config, root: Path, executor: Any = None) -> tuple[float, Any, list]:
    """Build ``cfg``'s database from scratch under ``root``: (wall s, database, per-layer
    (name, seconds since the previous layer was written))."""
    shutil.rmtree(root, ignore_errors=True)
    task = with_validation(load_task(cfg.task))
    marks: list[tuple[str, float]] = []
    t0 = time.perf_counter()
    db = build_database(task, cfg, root, device="cpu", progress=False, executor=executor,
                        on_layer_done=lambda n: marks.append((n, time.perf_counter())))
    wall = time.perf_counter() - t0
    times, prev = [], t0
    for name, t in marks:
        times.append((name, round(t - prev, 2)))
        prev = t
    return wall, db, times


def same_tables(a: Any, b: Any) -> bool:
    return all(np.array_equal(a.table(i.name).errors, b.table(i.name).errors) for i in a.order)


def bench_build(cfg_path: str, out: Path, workers: int) -> dict[str, Any]:
    from automl_compress.distributed import RayExecutor

    cfg = load_config(cfg_path)
    name = Path(cfg_path).stem
    row: dict[str, Any] = {"config": cfg_path, "load_before": load()}
    serial_s, serial_db, per_layer = timed_build(cfg, out / f"db_{name}_serial")
    print(f"{name}: serial build {serial_s:.1f} s", flush=True)
    ex = RayExecutor(ExecutorConfig(kind="ray", workers=workers))
    ray_s, ray_db, _ = timed_build(cfg, out / f"db_{name}_ray", ex)
    print(f"{name}: ray build ({workers} workers) {ray_s:.1f} s", flush=True)
    row.update(serial_s=round(serial_s, 1), ray_s=round(ray_s, 1),
               speedup=round(serial_s / ray_s, 2), identical=same_tables(serial_db, ray_db),
               layers=len(serial_db.order), serial_per_layer_s=per_layer,
               retried=len(ex.failures), load_after=load())
    return row


def timed_evo(prepared: pipeline.Prepared, evaluations: float) -> dict[str, Any]:
    a, cost, budget = prepared.cfg.alloc, prepared.cfg.cost, prepared.cfg.env.budget_bits
    ev = selection.evaluator(prepared, evaluations)
    start = allocate_dp(prepared.tables, budget, cost)
    t0 = time.perf_counter()
    res = evo_search(prepared.tables, budget, start, ev, cost, a.offspring, a.stages,
                     prepared.cfg.seed)
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 1), "passes": round(res.spend.evaluations, 3),
            "calls": res.spend.calls, "passes_per_min": round(60 * res.spend.evaluations / wall, 1),
            "calls_per_min": round(60 * res.spend.calls / wall, 1),
            "metric_val": res.metric_val, "plan": res.plan.key()}


def bench_search(cfg_path: str, out: Path, evaluations: float) -> dict[str, Any]:
    from automl_compress.distributed import RayExecutor

    cfg = load_config(cfg_path)
    name = Path(cfg_path).stem
    prepared = pipeline.prepare(cfg, out, db_dir=out / f"db_{name}_serial", progress=False)
    row: dict[str, Any] = {"config": cfg_path, "evaluations": evaluations, "load_before": load(),
                           "offspring": cfg.alloc.offspring, "stages": list(cfg.alloc.stages)}
    row["local"] = timed_evo(prepared, evaluations)
    print(f"evo local: {row['local']['passes_per_min']} passes/min", flush=True)
    for n in (1, 2):
        ex = RayExecutor(ExecutorConfig(kind="ray", workers=n))
        try:
            row[f"ray_{n}"] = timed_evo(dataclasses.replace(prepared, executor=ex), evaluations)
        finally:
            ex.close()
        print(f"evo ray {n}: {row[f'ray_{n}']['passes_per_min']} passes/min", flush=True)
    row["same_result"] = all(row[k]["plan"] == row["local"]["plan"] and
                             row[k]["calls"] == row["local"]["calls"] for k in ("ray_1", "ray_2"))
    for k in ("local", "ray_1", "ray_2"):
        row[k].pop("plan")
    row["load_after"] = load()
    return row


# ---------------------------------------------------------------------------------------------
# On paper: 8 GPUs


def resnet50_shapes() -> list[tuple[int, int]]:
    """(rows, cols) of ResNet-50's 53 convolutions and its fc layer (weight.flatten(1))."""
    shapes = [(64, 3 * 7 * 7)]
    c_in = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, c_in), (width, width * 9), (4 * width, width)]
            if b == 0:
                shapes.append((4 * width, c_in))
            c_in = 4 * width
    return shapes + [(1000, 2048)]


def llama7b_shapes() -> list[tuple[int, int]]:
    """(rows, cols) of a 7B LLaMA-style decoder's 224 linear layers (32 blocks: q, k, v, o at
    4096 x 4096, gate and up 11008 x 4096, down 4096 x 11008)."""
    block = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    return block * 32


def fit_power_law(times: dict[str, tuple[float | None, float]]) -> tuple[float, float, float]:
    """Least squares of log t = log c + α log rows + β log cols over the H100 reference layers."""
    pts = [(int(k.split("x")[0]), int(k.split("x")[1]), t) for k, (t, _) in times.items()
           if t is not None]
    A = np.array([[1.0, math.log(r), math.log(c)] for r, c, _ in pts])
    y = np.array([math.log(t) for _, _, t in pts])
    (lc, alpha, beta), *_ = np.linalg.lstsq(A, y, rcond=None)
    return math.exp(lc), float(alpha), float(beta)


def estimate(gpus: int = 8, quant_solves: int = 5, sparse_patterns: int = 3) -> dict[str, Any]:
    """Expected database wall time on ``gpus`` GPUs, from per-layer H100 times.

    Per layer: one quantization solve per bit-width (``quant_solves``: digits.yaml's 2, 3, 4, 6,
    8) for the dense pattern and for each of ``sparse_patterns`` sparse ones (2:4, 50 %, 75 %),
    each sparse pattern after one pruning pass. Counted as full-layer solves (an upper bound: the
    sparse ones run on the kept weights only). ResNet-50: OBQ and ExactOBS (the exact solvers);
    the LLM: GPTQ, its SparseGPT pruning passes timed as GPTQ passes (no SparseGPT reference).
    Each solver's per-layer time is a power law fitted to its seven reference layers
    (256-3072 rows, 256-4608 columns: the LLM's 11008-wide layers are an extrapolation). Wall =
    max(total / gpus, the longest unit); Hessian capture and transfers excluded.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from solvers import ANCHOR  # bench/solvers.py: the H100 per-layer references

    out: dict[str, Any] = {"gpus": gpus, "solves_per_layer": (
        f"{quant_solves} x (1 + {sparse_patterns}) quantization + {sparse_patterns} pruning")}
    for model, shapes, quant, prune in (("resnet50", resnet50_shapes(), "obq", "exact_obs_50"),
                                        ("llama7b", llama7b_shapes(), "gptq", "gptq")):
        cq, aq, bq = fit_power_law(ANCHOR[quant])
        cp, ap, bp = fit_power_law(ANCHOR[prune])
        tq = [cq * r**aq * c**bq for r, c in shapes]
        tp = [cp * r**ap * c**bp for r, c in shapes]
        quant_s = quant_solves * (1 + sparse_patterns) * sum(tq)
        prune_s = sparse_patterns * sum(tp)
        total = quant_s + prune_s
        # the longest unit: a sparse pattern's pruning pass and its quantizations of one layer
        longest = max(p + quant_solves * q for p, q in zip(tp, tq, strict=True))
        wall = max(total / gpus, longest)
        out[model] = {"layers": len(shapes), "quant_solver": quant, "prune_solver": prune,
                      "quant_fit": f"t = {cq:.3g} * rows^{aq:.2f} * cols^{bq:.2f} s",
                      "prune_fit": f"t = {cp:.3g} * rows^{ap:.2f} * cols^{bp:.2f} s",
                      "one_quant_pass_all_layers_min": round(sum(tq) / 60, 1),
                      "one_prune_pass_all_layers_min": round(sum(tp) / 60, 1),
                      "one_gpu_h": round(total / 3600, 2), "gpus_h": round(wall / 3600, 2),
                      "longest_unit_s": round(longest, 1)}
        print(f"{model}: {len(shapes)} layers; {quant} {out[model]['quant_fit']}, all layers "
              f"{sum(tq) / 60:.1f} min per pass; {prune} {out[model]['prune_fit']}, "
              f"{sum(tp) / 60:.1f} min per pass; {quant_solves * (1 + sparse_patterns)} x "
              f"{sum(tq) / 60:.1f} + {sparse_patterns} x {sum(tp) / 60:.1f} = {total / 3600:.2f} "
              f"h on one GPU; / {gpus} = {total / 3600 / gpus:.2f} h (longest unit "
              f"{longest:.0f} s) -> {wall / 3600:.2f} h on {gpus} GPUs", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["configs/digits.yaml"])
    ap.add_argument("--parts", nargs="+", default=["build", "search", "estimate"],
                    choices=("build", "search", "estimate"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--evaluations", type=float, default=24.0)
    ap.add_argument("--out", default="bench_out/distributed")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    import json

    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    if {"build", "search"} & set(args.parts):
        results["ray_start_s"] = round(start_ray(args.workers), 1)
    for cfg_path in args.configs if "build" in args.parts else []:
        results[f"build_{Path(cfg_path).stem}"] = bench_build(cfg_path, out, args.workers)
        atomic_write_json(path, results)
    if "search" in args.parts:
        results[f"search_{Path(args.configs[0]).stem}"] = bench_search(args.configs[0], out,
                                                                       args.evaluations)
    if "estimate" in args.parts:
        results["estimate"] = estimate()
    atomic_write_json(path, results)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
