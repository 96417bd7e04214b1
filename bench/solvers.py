"""Time and layer error of every solver on a synthetic protocol (docs/solvers.md §9).

W ~ N(0, 1/d_col); calibration inputs X = Z·A with A = diag(s)Qᵀ, s_i² = 1/(i+1), Q a random
orthogonal matrix, n = max(4·d_col, 2048); H = 2XᵀX/n in float64. The error is
‖WXᵀ − ŴXᵀ‖²_F / ‖WXᵀ‖²_F (shown ×10³), evaluated exactly through H. Times are the median of
``--repeats`` runs after one warm-up (CUDA-synchronised). The last columns compare with the
reference figures measured on one H100 (docs/solvers.md §9): ``t_ref/t`` (full-layer time, scaled
from ``--max-rows``) is only meaningful when this script runs on the same GPU kind; ``err/ref``
compares errors (the reference errors of the large shapes come from one 32-row batch, and a
``--max-rows`` subsample differs from the full layer by a few per cent either way).

Run:  python bench/solvers.py --device cpu --shapes 1024x256,768x768 --max-rows 64 --repeats 1
      python bench/solvers.py --device cuda            # all seven synthetic shapes, full layers
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from automl_compress.solvers import (
    exact_obs_prune,
    gptq_quantize,
    magnitude_prune,
    obq_quantize,
    rtn_quantize,
    sparsegpt_prune,
)
from automl_compress.solvers.refine import fast_quantize

SHAPES = ("256x2304", "512x4608", "1024x256", "2048x512", "1000x2048", "768x768", "3072x768")

# H100, OBC/GPTQ references (docs/solvers.md §9): (time s, error ×10³); None = not measured.
REFERENCE = {
    "obq": {"256x2304": (27.6, 2.88), "512x4608": (336, 2.72), "1024x256": (6.75, 4.08),
            "2048x512": (17.1, 3.45), "1000x2048": (87.4, 2.92), "768x768": (12.0, 3.36),
            "3072x768": (52.2, 3.33)},
    "gptq": {"256x2304": (0.68, 3.72), "512x4608": (1.33, 3.40), "1024x256": (0.15, 4.98),
             "2048x512": (0.15, 4.38), "1000x2048": (0.53, 3.77), "768x768": (0.22, 4.30),
             "3072x768": (0.23, 4.25)},
    "rtn": {"256x2304": (None, 11.86), "512x4608": (None, 12.04), "1024x256": (None, 11.15),
            "2048x512": (None, 11.71), "1000x2048": (None, 12.14), "768x768": (None, 11.91),
            "3072x768": (None, 12.02)},
    "exact_obs_50": {"256x2304": (25.9, 14.0), "512x4608": (340, 13.5), "1024x256": (4.08, 21.9),
                     "2048x512": (12.3, 17.2), "1000x2048": (78.1, 14.3),
                     "768x768": (7.63, 16.5), "3072x768": (29.6, 16.4)},
    "exact_obs_90": {"256x2304": (None, 169), "512x4608": (None, 163), "1024x256": (None, 240),
                     "2048x512": (None, 206), "1000x2048": (None, 168), "768x768": (None, 198),
                     "3072x768": (None, 196)},
    "exact_obs_2_4": {"256x2304": (11.0, 30.5), "512x4608": (151, 29.5), "1024x256": (1.40, 46.0),
                      "2048x512": (5.74, 37.4), "1000x2048": (31.3, 31.2),
                      "768x768": (3.55, 36.2), "3072x768": (13.5, 35.6)},
    "magnitude_50": {"256x2304": (None, 71.7), "512x4608": (None, 70.7),
                     "1024x256": (None, 73.0), "2048x512": (None, 71.4),
                     "1000x2048": (None, 71.7), "768x768": (None, 72.9),
                     "3072x768": (None, 72.5)},
    "magnitude_2_4": {"256x2304": (None, 131.1), "512x4608": (None, 131.2),
                      "1024x256": (None, 136.9), "2048x512": (None, 132.8),
                      "1000x2048": (None, 133.2), "768x768": (None, 134.5),
                      "3072x768": (None, 133.5)},
}


def make_layer(rows: int, cols: int, device: str, seed: int = 0):
    """The synthetic layer of docs/solvers.md §9.1: (W float32, H float64) on ``device``."""
    g = torch.Generator().manual_seed(seed)
    n = max(4 * cols, 2048)
    Q, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    s = 1.0 / torch.sqrt(torch.arange(1, cols + 1, dtype=torch.float64))
    X = torch.randn(n, cols, generator=g, dtype=torch.float64) @ (torch.diag(s) @ Q.T)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64) / cols**0.5
    H = 2 * X.T @ X / n
    return W.float().to(device), H.to(device)


def methods(bits: int):
    """name -> (callable(W, H) -> list of (label, SolveResult))."""
    return {
        "rtn": lambda W, H: [("rtn", rtn_quantize(W, bits, H=H))],
        "obq": lambda W, H: [("obq", obq_quantize(W, H, bits, damp=0.0))],
        "gptq": lambda W, H: [("gptq", gptq_quantize(W, H, bits))],
        "fast": lambda W, H: [("fast", fast_quantize(W, H, bits))],
        "exact_obs": lambda W, H: list(
            zip(("exact_obs_50", "exact_obs_90"),
                exact_obs_prune(W, H, sparsity=[0.5, 0.9], damp=0.0), strict=True)
        ),
        "exact_obs_2_4": lambda W, H: [("exact_obs_2_4", exact_obs_prune(W, H, n_m=(2, 4)))],
        "sparsegpt": lambda W, H: [("sparsegpt_50", sparsegpt_prune(W, H, sparsity=0.5))],
        "magnitude": lambda W, H: [
            ("magnitude_50", magnitude_prune(W, 0.5, H=H)),
            ("magnitude_2_4", magnitude_prune(W, n_m=(2, 4), H=H)),
        ],
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _status_mib(field: str) -> float | None:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MiB, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's peak resident set (VmHWM) to its current size (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def run(fn, W, H, device: str, repeats: int):
    """(results of the last run, median seconds, peak MiB or None).

    On the CPU the peak is the resident memory the warm-up call adds above the process before it
    (VmHWM after − VmRSS before; later calls reuse what malloc kept), after a one-row call has
    paid the first-call costs (imports); on CUDA the peak allocated memory of the timed calls.
    """
    if device == "cpu":
        fn(W[:1], H)
    cpu_peak = device == "cpu" and _reset_peak_rss()
    before = _status_mib("VmRSS") if cpu_peak else None
    fn(W, H)  # warm-up
    after = _status_mib("VmHWM") if cpu_peak else None
    times = []
    peak = max(after - before, 0.0) if after is not None and before is not None else None
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        sync(device)
        t = time.perf_counter()
        out = fn(W, H)
        sync(device)
        times.append(time.perf_counter() - t)
        if device == "cuda":
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out, statistics.median(times), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--methods", default="rtn,obq,gptq,fast,exact_obs,exact_obs_2_4,sparsegpt,"
                    "magnitude")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--max-rows", type=int, default=None, help="solve only the first N rows")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: this torch {torch.__version__} sees no CUDA device; "
                         "run on a GPU machine with a CUDA build of torch, or pass --device cpu")
    table = methods(args.bits)
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}"
          + (f" gpu={torch.cuda.get_device_name(0)}" if args.device == "cuda" else ""))
    print(f"{'shape':>10} {'method':>14} {'time s':>9} {'peak MiB':>9} {'err x1e3':>9} "
          f"{'t_ref/t':>8} {'err/ref':>8}")
    for shape in args.shapes.split(","):
        rows, cols = (int(v) for v in shape.split("x"))
        W, H = make_layer(rows, cols, args.device)
        if args.max_rows:
            W = W[: args.max_rows].contiguous()
        dense = float(0.5 * ((W.double() @ H) * W.double()).sum())
        for name in args.methods.split(","):
            results, t, peak = run(table[name], W, H, args.device, args.repeats)
            for label, res in results:
                err = res.error / dense * 1e3
                ref_t, ref_e = REFERENCE.get(label, {}).get(shape, (None, None))
                scale = rows / W.shape[0]  # compare times of the full layer
                tr = f"{ref_t / (t * scale):8.1f}" if ref_t else f"{'-':>8}"
                quant = label in ("obq", "gptq", "rtn")
                comparable = ref_e is not None and (args.bits == 4 or not quant)
                er = f"{err / ref_e:8.3f}" if comparable else f"{'-':>8}"
                pk = f"{peak:9.0f}" if peak is not None else f"{'-':>9}"
                print(f"{shape:>10} {label:>14} {t:9.3f} {pk} {err:9.3f} {tr} {er}", flush=True)


if __name__ == "__main__":
    main()
