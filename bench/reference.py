"""Side by side with the public OBC and GPTQ reference code, on one CPU core, in one run.

The references are loaded from folders the user fetched (none of their code is in this repo):

    git clone https://github.com/IST-DASLab/OBC  /work/refs/OBC
    git clone https://github.com/IST-DASLab/gptq /work/refs/gptq
    taskset -c 1 python bench/reference.py --obc /work/refs/OBC --gptq /work/refs/gptq

They run unmodified except that ``torch.cuda.synchronize`` / ``empty_cache`` become no-ops and
their per-batch prints are silenced. Data: the protocol of bench/solvers.py (W ~ N(0, 1/d),
X = Z·A with a power-law spectrum, n = max(4d, 2048), H = 2XᵀX/n in float64), float32 weights.
Settings are the references' defaults: OBQ 4-bit per-channel symmetric with the MSE grid search,
rel_damp 0, 32 rows per batch; ExactOBS one pass read at 50 % and 90 %; 2:4; GPTQ block 128,
1 % damping, on OBQ's grid. Ours get the same grid and damping. Exact modes run the first
``--rows`` rows on both sides; GPTQ and the fast mode run the whole layer. Every call of both
sides runs once on a small layer before anything is timed (one-off costs such as imports are
timed on neither side); every measurement alternates which side runs first, and times are
medians over ``--repeats``.

The script re-executes itself with glibc's malloc tuned
(``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736``): the
reference allocates a fresh 32×d×d temporary every greedy step, which glibc would map and unmap
(two thirds of its time in page faults; a GPU's caching allocator has no such cost). Both sides
run under the same setting. ``--no-malloc-tuning`` keeps the default allocator.

Ratio = reference time / our time; error = ours / reference, both ‖(W−Ŵ)Xᵀ‖² / ‖WXᵀ‖².
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import io
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from automl_compress.solvers import exact_obs_prune, gptq_quantize, obq_quantize  # noqa: E402
from automl_compress.solvers.refine import (  # noqa: E402
    DEFAULT_BLOCK,
    DEFAULT_CARRY,
    fast_quantize,
    polish,
)
from bench.solvers import make_layer  # noqa: E402

TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}; pass the folder of a fetched checkout")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_references(obc: Path, gptq: Path) -> tuple[types.ModuleType, ...]:
    """(trueobs, OBC's quant, gptq, GPTQ's quant): both repos name their grid module 'quant'."""
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    for folder, files in ((obc, ("trueobs.py", "quant.py")), (gptq, ("gptq.py", "quant.py"))):
        for f in files:
            if not (folder / f).is_file():
                raise SystemExit(f"{folder / f} not found; clone the reference repo there")
    q_obc = _load("quant", obc / "quant.py")
    trueobs = _load("ref_trueobs", obc / "trueobs.py")
    del sys.modules["quant"]
    if "transformers" not in sys.modules:  # gptq.py imports it only for its Conv1D class
        try:
            import transformers  # noqa: F401
        except ImportError:
            stub = types.ModuleType("transformers")
            stub.Conv1D = type("Conv1D", (torch.nn.Module,), {})
            sys.modules["transformers"] = stub
    q_gptq = _load("quant", gptq / "quant.py")
    gptq_mod = _load("ref_gptq", gptq / "gptq.py")
    del sys.modules["quant"]
    return trueobs, q_obc, gptq_mod, q_gptq


def rel_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    D = (W - W_hat).double()
    Wd = W.double()
    return float(((D @ H) * D).sum() / ((Wd @ H) * Wd).sum())


class Reference:
    """The reference calls, each returning the compressed weight(s)."""

    def __init__(self, mods: tuple[types.ModuleType, ...], bits: int) -> None:
        self.trueobs, self.q_obc, self.gptq, self.q_gptq = mods
        self.bits = bits

    def _obs(self, W: torch.Tensor, H: torch.Tensor):
        layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        layer.weight.data = W.clone()
        obs = self.trueobs.TrueOBS(layer, rel_damp=0)
        obs.H = H.clone()
        obs.nsamples = 1
        return layer, obs

    def obq(self, W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        layer, obs = self._obs(W, H)
        obs.quantizer = self.q_obc.Quantizer()
        obs.quantizer.configure(self.bits, perchannel=True, sym=True, mse=True)
        with contextlib.redirect_stdout(io.StringIO()):
            obs.quantize(32)
        return layer.weight.data

    def unstructured(self, W: torch.Tensor, H: torch.Tensor) -> list[torch.Tensor]:
        _, obs = self._obs(W, H)
        with contextlib.redirect_stdout(io.StringIO()):
            obs.prepare_unstr(32)
            return obs.prune_unstr([0.5, 0.9])

    def nm(self, W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        layer, obs = self._obs(W, H)
        with contextlib.redirect_stdout(io.StringIO()):
            obs.nmprune(2, 4, 32)
        return layer.weight.data

    def gptq_quant(self, W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        layer.weight.data = W.clone()
        g = self.gptq.GPTQ(layer)
        g.H = H.float().clone()
        g.nsamples = 1
        g.quantizer = self.q_gptq.Quantizer()
        g.quantizer.configure(self.bits, perchannel=True, sym=True, mse=True)
        with contextlib.redirect_stdout(io.StringIO()):
            g.fasterquant(blocksize=128, percdamp=0.01)
        return layer.weight.data


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def pair(ref_fn, our_fn, repeats: int):
    """Alternate the two sides; (ref output, our output, median ref s, median our s)."""
    t_ref, t_our = [], []
    out_ref = out_our = None
    for i in range(repeats):
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            if side == 0:
                out_ref, t = timed(ref_fn)
                t_ref.append(t)
            else:
                out_our, t = timed(our_fn)
                t_our.append(t)
    return out_ref, out_our, statistics.median(t_ref), statistics.median(t_our)


def same_codes(W_a: torch.Tensor, W_b: torch.Tensor, scale: torch.Tensor) -> str:
    ca = torch.round(W_a.double() / scale.double()[:, None])
    cb = torch.round(W_b.double() / scale.double()[:, None])
    return f"{int((ca == cb).all(1).sum())}/{W_a.shape[0]}"


def warm_up(ref: Reference, bits: int) -> None:
    """Every call of both sides once on a small layer, so that one-off costs (imports such as
    scikit-learn's isotonic regression, first-call allocations) are timed on neither side."""
    W, H = make_layer(16, 64, "cpu")
    for fn in (ref.obq, ref.unstructured, ref.nm, ref.gptq_quant):
        fn(W, H)
    polish(W, H, obq_quantize(W, H, bits, damp=0.0))
    exact_obs_prune(W, H, [0.5, 0.9], damp=0.0)
    exact_obs_prune(W, H, n_m=(2, 4), damp=0.0)
    gptq_quantize(W, H, bits)
    fast_quantize(W, H, bits)


def obq_cell(ref: Reference, Ws: torch.Tensor, H: torch.Tensor, b: int, rep: int) -> str:
    """OBQ's greedy against the reference's, and the greedy followed by 1-opt (solver.polish)."""
    r, o, tr, to = pair(lambda: ref.obq(Ws, H), lambda: obq_quantize(Ws, H, b, damp=0.0), rep)
    _, p, _, tp = pair(lambda: None, lambda: polish(Ws, H, o), rep)
    e_ref = rel_error(Ws, r, H)
    return (f"{tr / to:.1f}× ({tr:.2f}/{to:.2f} s), err {rel_error(Ws, o.weight, H) / e_ref:.4f}, "
            f"same codes {same_codes(r, o.weight, o.scale)}; with 1-opt {tr / (to + tp):.1f}×, "
            f"err {rel_error(Ws, p.weight, H) / e_ref:.4f}")


def exact_obs_cell(ref: Reference, Ws: torch.Tensor, H: torch.Tensor, rep: int) -> str:
    """The ExactOBS one pass read at 50 % and 90 %."""
    r, o, tr, to = pair(lambda: ref.unstructured(Ws, H),
                        lambda: exact_obs_prune(Ws, H, [0.5, 0.9], damp=0.0), rep)
    errs = [rel_error(Ws, oo.weight, H) / rel_error(Ws, rr, H) for rr, oo in zip(r, o, strict=True)]
    return f"{tr / to:.1f}× ({tr:.2f}/{to:.2f} s), err {errs[0]:.3f} / {errs[1]:.3f}"


def nm_cell(ref: Reference, Ws: torch.Tensor, H: torch.Tensor, rep: int) -> str:
    """ExactOBS at 2:4."""
    r, o, tr, to = pair(lambda: ref.nm(Ws, H),
                        lambda: exact_obs_prune(Ws, H, n_m=(2, 4), damp=0.0), rep)
    return (f"{tr / to:.1f}× ({tr:.2f}/{to:.2f} s), err "
            f"{rel_error(Ws, o.weight, H) / rel_error(Ws, r, H):.4f}")


def gptq_and_fast_cells(ref: Reference, W: torch.Tensor, H: torch.Tensor, b: int, rep: int,
                        fast: list[tuple[int, int]]) -> list[str]:
    """GPTQ against the reference's, and the fast mode at each (block, carry) of ``fast`` against
    GPTQ's time and OBQ's error (on the whole layer)."""
    r, o, tr, to = pair(lambda: ref.gptq_quant(W, H), lambda: gptq_quantize(W, H, b), max(rep, 3))
    cells = [f"{tr / to:.2f}× ({tr:.3f}/{to:.3f} s), err "
             f"{rel_error(W, o.weight, H) / rel_error(W, r, H):.4f}"]
    if fast:
        full = rel_error(W, obq_quantize(W, H, b, damp=0.0).weight, H)
        parts = []
        for block, carry in fast:
            run = functools.partial(fast_quantize, W, H, b, block_size=block, carry=carry)
            _, f, _, tf = pair(lambda: None, run, max(rep, 3))
            parts.append(f"B {block} carry {carry}: {tf / tr:.2f}× GPTQ-ref time, "
                         f"{tf / to:.2f}× ours; err {rel_error(W, f.weight, H) / full:.3f}× OBQ")
        cells.append("; ".join(parts))
    return cells


COLUMNS = ("obq", "exact_obs", "nm", "gptq", "fast")


def run_shape(ref: Reference, rows: int, cols: int, sub: int, args) -> list[str]:
    W, H = make_layer(rows, cols, "cpu")
    Ws = W[:sub].contiguous()
    b, rep, want = args.bits, args.repeats, set(args.columns.split(","))
    cells = [
        obq_cell(ref, Ws, H, b, rep) if "obq" in want else "–",
        exact_obs_cell(ref, Ws, H, rep) if "exact_obs" in want else "–",
        nm_cell(ref, Ws, H, rep) if "nm" in want else "–",
    ]
    if want & {"gptq", "fast"}:
        cells += gptq_and_fast_cells(ref, W, H, b, rep, args.fast_settings if "fast" in want
                                     else [])
    return cells + ["–"] * (len(COLUMNS) - len(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--obc", type=Path, required=True, help="folder of IST-DASLab/OBC")
    ap.add_argument("--gptq", type=Path, required=True, help="folder of IST-DASLab/gptq")
    ap.add_argument("--shapes", default="256x256,512x512,768x768,1024x1024,1536x1536")
    ap.add_argument("--rows", default="256,64,64,32,32",
                    help="rows the exact modes run, per shape (both sides)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-malloc-tuning", action="store_true")
    ap.add_argument("--columns", default=",".join(COLUMNS),
                    help="columns to run, of " + ",".join(COLUMNS) + " (fast times against the "
                         "GPTQ reference, so it runs GPTQ too)")
    ap.add_argument("--fast-settings", default=f"{DEFAULT_BLOCK}:{DEFAULT_CARRY}",
                    help="fast-mode settings to run, BLOCK:CARRY,... (default the solver's)")
    args = ap.parse_args()
    try:
        args.fast_settings = [(int(x), int(y)) for x, y in
                              (v.split(":") for v in args.fast_settings.split(","))]
    except ValueError:
        ap.error(f"--fast-settings takes BLOCK:CARRY,..., e.g. 16:16,64:0; found "
                 f"{args.fast_settings!r}")
    unknown = set(args.columns.split(",")) - set(COLUMNS)
    if unknown:
        ap.error(f"--columns takes {','.join(COLUMNS)}, found {','.join(sorted(unknown))}")
    if not args.no_malloc_tuning and os.environ.get("GLIBC_TUNABLES") != TUNABLES:
        os.environ["GLIBC_TUNABLES"] = TUNABLES
        os.execv(sys.executable, [sys.executable, *sys.argv])
    torch.set_num_threads(1)
    ref = Reference(load_references(args.obc, args.gptq), args.bits)
    malloc = "default" if args.no_malloc_tuning else f"GLIBC_TUNABLES={TUNABLES}"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, malloc {malloc}, "
          f"affinity {sorted(os.sched_getaffinity(0))}")
    print("| shape (exact rows) | OBQ 4-bit | ExactOBS pass 50 / 90 % | ExactOBS 2:4 | GPTQ | "
          "fast mode |")
    print("|---|---|---|---|---|---|")
    warm_up(ref, args.bits)
    subs = [int(v) for v in args.rows.split(",")]
    for shape, sub in zip(args.shapes.split(","), subs, strict=True):
        rows, cols = (int(v) for v in shape.split("x"))
        cells = run_shape(ref, rows, cols, min(sub, rows), args)
        print(f"| {shape} ({min(sub, rows)}) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
