"""Speed and error of the pruning solvers (ExactOBS, SparseGPT, exact re-solve) on synthetic layers.

Inputs are correlated, X = Z·A with A = I + 0.7·G/√cols (Z, G standard normal), H = 2XᵀX/n,
n = 4·cols; W is standard normal. Errors are layer errors Σ_r 0.5·(w−ŵ)H(w−ŵ)ᵀ, reported
relative to the dense output energy Σ_r 0.5·w H wᵀ.

Run:  OMP_NUM_THREADS=1 /tmp/venv/bin/python bench/pruning_solvers.py --shapes 128x256,128x512
(one thread gives stable CPU timings on a shared machine; on a GPU pass --device cuda).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from automl_compress.solvers import exact_obs_prune, magnitude_prune, sparsegpt_prune
from automl_compress.solvers.lstsq import resolve_on_mask


def layer(rows: int, cols: int, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    A = torch.eye(cols, dtype=torch.float64)
    A = A + 0.7 * torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols**0.5
    n = 4 * cols
    X = torch.randn(n, cols, generator=g, dtype=torch.float64) @ A
    H = 2 * X.T @ X / n
    return W.to(device), H.to(device)


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def bench_shape(rows: int, cols: int, device: str) -> dict:
    W, H = layer(rows, cols, device=device)
    dense = float(0.5 * ((W.double() @ H.double()) * W.double()).sum())
    rel = lambda r: r.error / dense  # noqa: E731
    out = {"shape": f"{rows}x{cols}", "device": device}
    levels, t = timed(lambda: exact_obs_prune(W, H, sparsity=[0.5, 0.7, 0.9]))
    out["exact_obs_3_levels_s"] = round(t, 3)
    out["exact_obs_rel_err"] = {
        str(s): round(rel(r), 5) for s, r in zip((0.5, 0.7, 0.9), levels, strict=True)
    }
    order = levels[0].info["order"]
    for name, kw in (
        ("eager", {"lazy_rank": 1, "active_set": False}),
        ("lazy32", {"lazy_rank": 32, "active_set": False}),
        ("lazy32_active_set", {"lazy_rank": 32, "active_set": True}),
    ):
        res, t = timed(lambda kw=kw: exact_obs_prune(W, H, sparsity=0.5, **kw))
        out[f"exact_obs_{name}_s"] = round(t, 3)
        out[f"same_order_{name}"] = bool(torch.equal(res.info["order"], order))
    uni = exact_obs_prune(W, H, sparsity=0.5, allocation="uniform")
    out["exact_obs_uniform_rel_err_0.5"] = round(rel(uni), 5)
    out["magnitude_rel_err"] = {
        str(s): round(rel(magnitude_prune(W, s, H=H)), 5) for s in (0.5, 0.7, 0.9)
    }
    nm, t = timed(lambda: exact_obs_prune(W, H, n_m=(2, 4)))
    out["exact_obs_2:4_s"] = round(t, 3)
    out["exact_obs_2:4_rel_err"] = round(rel(nm), 5)
    out["magnitude_2:4_rel_err"] = round(rel(magnitude_prune(W, n_m=(2, 4), H=H)), 5)
    blk, t = timed(lambda: exact_obs_prune(W, H, sparsity=0.5, block=4))
    out["exact_obs_block4_s"] = round(t, 3)
    out["exact_obs_block4_rel_err"] = round(rel(blk), 5)
    sg, t = timed(lambda: sparsegpt_prune(W, H, 0.5))
    out["sparsegpt_0.5_s"] = round(t, 3)
    out["sparsegpt_0.5_rel_err"] = round(rel(sg), 5)
    ls, t = timed(lambda: resolve_on_mask(W, H, sg.mask))
    out["resolve_sparsegpt_mask_s"] = round(t, 3)
    out["resolve_sparsegpt_mask_rel_err"] = round(rel(ls), 5)
    sg24 = sparsegpt_prune(W, H, n_m=(2, 4))
    out["sparsegpt_2:4_rel_err"] = round(rel(sg24), 5)
    info_bytes = sum(
        v.numel() * v.element_size() for v in levels[0].info.values() if isinstance(v, torch.Tensor)
    )
    out["info_host_bytes"] = int(info_bytes)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="128x256,128x512")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    for spec in args.shapes.split(","):
        rows, cols = (int(v) for v in spec.split("x"))
        print(json.dumps(bench_shape(rows, cols, args.device)), flush=True)


if __name__ == "__main__":
    main()
