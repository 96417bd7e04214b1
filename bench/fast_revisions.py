"""The fast mode of this checkout against the one of an earlier git revision, same layers, one run.

A new fast mode changes the code path, so a setting of the new code that reproduces the old
results is not the old code's time. This loads ``automl_compress/solvers/refine.py`` as it was
at ``--rev`` (from git, beside the current package: its imports are the current modules) and
alternates the two on bench/solvers.py's synthetic layers, with our GPTQ in the same run for
scale. Error: against OBQ's greedy (damp 0) on the first ``--rows`` rows.

Run:  taskset -c 1 python bench/fast_revisions.py --rev 7887fab [--repeats 2]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# the synthetic layer of the solver bench and the side-by-side bench's helpers (bench/ is on
# sys.path when run)
from reference import rel_error, timed
from solvers import make_layer

from automl_compress.solvers import gptq_quantize, obq_quantize
from automl_compress.solvers.refine import fast_quantize

ROOT = Path(__file__).resolve().parents[1]
REFINE = "automl_compress/solvers/refine.py"


def old_fast(rev: str):
    """``fast_quantize`` of refine.py at git revision ``rev``."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{REFINE}"],
                         capture_output=True, text=True, check=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "refine_at_rev.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location("refine_at_rev", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod.fast_quantize


def best_of(fn, repeats: int):
    """(last output, fastest of ``repeats`` timed calls)."""
    runs = [timed(fn) for _ in range(repeats)]
    return runs[-1][0], min(t for _, t in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rev", required=True, help="git revision whose fast mode to compare")
    ap.add_argument("--shapes", default="256x256,512x512,1024x1024,1536x1536")
    ap.add_argument("--rows", default="256,64,32,32", help="rows OBQ's error is taken on")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="best of, per call")
    ap.add_argument("--rounds", type=int, default=2, help="old/new alternations per shape")
    args = ap.parse_args()
    torch.set_num_threads(1)
    old = old_fast(args.rev)
    print(f"| shape | our GPTQ s | fast at {args.rev}: s, err × OBQ | fast here: s, err × OBQ |")
    print("|---|---|---|---|")
    for shape, sub in zip(args.shapes.split(","), args.rows.split(","), strict=True):
        rows, cols = (int(v) for v in shape.split("x"))
        W, H = make_layer(rows, cols, "cpu")
        k = min(int(sub), rows)
        base = rel_error(W[:k], obq_quantize(W[:k], H, args.bits, damp=0.0).weight, H)
        old(W[:8], H, args.bits)
        fast_quantize(W[:8], H, args.bits)
        cells: dict[str, list[str]] = {"gptq": [], "old": [], "new": []}
        for _ in range(args.rounds):
            for name, fn in (("gptq", gptq_quantize), ("old", old), ("new", fast_quantize)):
                res, t = best_of(functools.partial(fn, W, H, args.bits), args.repeats)
                err = "" if name == "gptq" else \
                    f", {rel_error(W[:k], res.weight[:k], H) / base:.3f}"
                cells[name].append(f"{t:.3f}{err}")
        print(f"| {shape} | " + " | ".join("; ".join(cells[n]) for n in ("gptq", "old", "new"))
              + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
