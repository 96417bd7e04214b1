"""The N:M pass's flush rank on this machine: the default, the whole-pass queue and other ranks.

The N:M pass runs without compaction on the CPU, so its lazy inverse either flushes every r
steps (a GEMM over every row's n × n inverse) or queues the whole pass and never forms the
per-row inverses (every pivot row is H⁻¹'s row minus all pending factors). Both are
memory-bound; which wins depends on the machine's memory bandwidth and caches, and on what
else shares them. This times, alternated in one run on bench/solvers.py's synthetic layers:
the default (``exact_obs.nm_lazy_rank``), the whole-pass queue with the row batch that keeps it
in 16 MiB (the default before 2026-12-07), and each rank of ``--ranks``. Every setting gives the
same masks and weights (tests/solvers/test_exact_obs.py); only the time differs.

Run:  taskset -c 1 python bench/nm_rank.py [--shapes 256x256,512x512 --rows 256,64 --ranks 16,64]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics

import torch

# bench/ is on sys.path when run
from reference import TUNABLES, timed
from solvers import make_layer

from automl_compress.solvers import exact_obs_prune
from automl_compress.solvers.exact_obs import nm_lazy_rank
from automl_compress.solvers.numerics import auto_row_batch

QUEUE_BYTES = 16 << 20  # the previous default's queue size
QUEUE_MIN_ROWS = 8


def queue_setting(rows: int, cols: int, steps: int) -> dict[str, int]:
    """The previous default: the batch shrunk until the whole pass's queue fits QUEUE_BYTES
    (unless that left under QUEUE_MIN_ROWS rows), the whole pass queued where it fits, else
    flushes at rank 64."""
    R = auto_row_batch(rows, cols, torch.float32, torch.device("cpu"))
    fit = QUEUE_BYTES // (steps * cols * 4)
    if fit >= QUEUE_MIN_ROWS:
        R = min(R, fit)
    return {"row_batch": R, "lazy_rank": steps if R * steps * cols * 4 <= QUEUE_BYTES else 64}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="256x256,512x512,1024x1024,1536x1536")
    ap.add_argument("--rows", default="256,64,32,32", help="rows solved at each shape")
    ap.add_argument("--ranks", default="16,32,64,128")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n-m", default="2:4")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n, m = (int(x) for x in args.n_m.split(":"))
    print(f"torch {torch.__version__}, threads 1, {args.n_m}, malloc "
          f"{os.environ.get('GLIBC_TUNABLES', 'default')} (bench/reference.py's: {TUNABLES})")
    print("| shape (rows) | default | whole-pass queue (previous default) | "
          + " | ".join(f"rank {r}" for r in args.ranks.split(",")) + " |")
    print("|---" * (3 + len(args.ranks.split(","))) + "|")
    for shape, rows in zip(args.shapes.split(","), args.rows.split(","), strict=True):
        r_out, cols = (int(x) for x in shape.split("x"))
        W, H = make_layer(r_out, cols, "cpu")
        W = W[: int(rows)].contiguous()
        steps = cols // m * (m - n)
        settings = {f"default (rank {nm_lazy_rank(cols)})": {},
                    "queue": queue_setting(W.shape[0], cols, steps)}
        settings |= {f"rank {r}": {"lazy_rank": int(r)} for r in args.ranks.split(",")}
        run = functools.partial(exact_obs_prune, W, H, n_m=(n, m), damp=0.0)
        times: dict[str, list[float]] = {k: [] for k in settings}
        for kw in settings.values():  # one untimed call each
            run(**kw)
        for _ in range(args.repeats):
            for name, kw in settings.items():
                times[name].append(timed(functools.partial(run, **kw))[1])
        cells = [f"{statistics.median(t):.3f} s" for t in times.values()]
        cells[0] = f"{cells[0]} (rank {nm_lazy_rank(cols)})"
        q = settings["queue"]
        cells[1] = f"{cells[1]} ({q['row_batch']} rows, rank {q['lazy_rank']})"
        print(f"| {shape} ({rows}) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
