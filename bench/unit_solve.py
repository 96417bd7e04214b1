"""Time of one database unit with H's inverse factor shared by its solves, against once a solve.

A database unit is one (W, H) piece at one pattern and every bit-width of the menu
(``database/solve.py``). The fixed-order solvers (GPTQ, SparseGPT, the fast mode) factor
``H⁻¹ = UᵀU`` in their column order, ``O(cols³)``, before a sweep of ``O(rows·cols²)``; a unit
now factors once per column order (``solvers.hessian.InverseFactors``), where each solve used to
factor on its own. Both ways run here on the same piece, in one process, and must give the same
codes (checked). The piece is bench/solvers.py's synthetic layer (docs/solvers.md §9.1).

Run:  OMP_NUM_THREADS=1 python bench/unit_solve.py --shapes 128x2048,128x4096 [--no-polish]
"""

from __future__ import annotations

import argparse
import time

import torch

# the synthetic layer of the solver bench (bench/ is on sys.path when run)
from solvers import make_layer

from automl_compress.config import SolverConfig
from automl_compress.database import solve, work
from automl_compress.solvers import registry
from automl_compress.solvers.registry import PruneSolver, QuantSolver


def per_solve(W: torch.Tensor, H: torch.Tensor, pattern: str, bits: tuple[int, ...],
              cfg: SolverConfig) -> list[solve.PieceSolution]:
    """The unit as it ran before: every solve factors H on its own."""
    quant, prune = QuantSolver(cfg.quant), PruneSolver(cfg.prune)
    opts = work.solve_options(pattern, bits[0], cfg)
    shared = None
    if not opts.dense and (prune, quant) not in registry.JOINT:
        shared = registry.prune(W, H, opts, prune)
    return [solve._piece_solution(b, registry.solve(W, H, work.solve_options(pattern, b, cfg),
                                                    quant, prune, shared)) for b in bits]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="128x2048,128x4096", help="rows x cols, comma-separated")
    ap.add_argument("--patterns", default="dense,2:4,50%")
    ap.add_argument("--bits", default="2,3,4,6,8")
    ap.add_argument("--quant", default="gptq")
    ap.add_argument("--prune", default="sparsegpt")
    ap.add_argument("--polish", action=argparse.BooleanOptionalAction, default=True,
                    help="1-opt after every solve (solver.polish)")
    args = ap.parse_args()
    bits = tuple(int(b) for b in args.bits.split(","))
    cfg = SolverConfig(quant=args.quant, prune=args.prune, polish=args.polish)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {args.quant} + "
          f"{args.prune}, bits {bits}, polish {'on' if args.polish else 'off'}")
    print("| piece | pattern | factor once a solve (s) | once a unit (s) | ratio | same codes |")
    print("|---|---|---:|---:|---:|---|")
    for shape in args.shapes.split(","):
        rows, cols = (int(x) for x in shape.split("x"))
        W, H = make_layer(rows, cols, "cpu")
        for pattern in args.patterns.split(","):
            t0 = time.perf_counter()
            before = per_solve(W, H, pattern, bits, cfg)
            t1 = time.perf_counter()
            after = solve.solve_unit(W, H, pattern, bits, cfg)
            t2 = time.perf_counter()
            same = all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
                       for a, b in zip(before, after, strict=True))
            print(f"| {shape} | {pattern} | {t1 - t0:.2f} | {t2 - t1:.2f} | "
                  f"{(t1 - t0) / (t2 - t1):.2f}× | {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
