"""How far each solver is from the exact optimum of the layer problem, on small layers.

For every row w of a layer, with H = 2XᵀX/n shared by the rows (docs/solvers.md §1):

* quantization to the row's grid (the one every quantizer here uses): the exact optimum of
  ``min_c ½ (s·(c − z) − w)ᵀ H (s·(c − z) − w)`` over integer codes c ∈ [0, 2^b − 1]^d, by
  branch-and-bound (Schnorr–Euchner enumeration on the Cholesky factor of H, started from the best
  solver's solution as the radius). A row whose search exceeds ``--node-limit`` nodes is reported
  as unproven and left out of the gaps (the count is printed);
* pruning (a fixed count of zeros per row, or 2:4): the exact optimum over every support, by
  enumeration; a support P of removed weights costs ``½ w_Pᵀ ((H⁻¹)_PP)⁻¹ w_P`` (the refit of the
  kept weights is optimal).

The gap of a method is Σ_r err_r / Σ_r opt_r − 1 over the proven rows (errors under the undamped
H; the solvers run with ``damp=0``). Data: the protocol of bench/solvers.py at small widths.

Run:  python bench/optimality_gap.py --cols 12,16,20 --rows 16
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from automl_compress.solvers import (  # noqa: E402
    exact_obs_prune,
    fast_quantize,
    fit_grid,
    gptq_quantize,
    magnitude_prune,
    obq_quantize,
    rtn_quantize,
    sparsegpt_prune,
)
from bench.solvers import make_layer  # noqa: E402


def best_codes(t: np.ndarray, R: np.ndarray, lo: float, hi: float, start: np.ndarray,
               node_limit: int) -> tuple[np.ndarray, float, bool]:
    """Integer c in [lo, hi]^d minimising ‖R (c − t)‖² (R upper triangular), depth first.

    Returns (codes, value, proven). ``start`` is a feasible point whose value seeds the radius.
    """
    d = t.size
    best = start.astype(float).copy()
    radius = float(np.sum((R @ (best - t)) ** 2))
    c = np.zeros(d)
    nodes = 0
    # level i fixes c_i given c_{i+1..}: residual e_i = R_ii (c_i − t_i) + Σ_{j>i} R_ij (c_j − t_j)

    def visit(i: int, partial: float) -> bool:
        nonlocal radius, best, nodes
        off = float(R[i, i + 1:] @ (c[i + 1:] - t[i + 1:])) if i + 1 < d else 0.0
        centre = t[i] - off / R[i, i]
        # Schnorr–Euchner: candidates in order of distance from the centre, within the box
        first = min(max(round(centre), lo), hi)
        cands = [first]
        for k in range(1, int(hi - lo) + 1):
            for v in (first + k, first - k) if centre >= first else (first - k, first + k):
                if lo <= v <= hi:
                    cands.append(v)
        cands.sort(key=lambda v: abs(v - centre))
        for v in cands:
            nodes += 1
            if nodes > node_limit:
                return False
            cost = partial + (R[i, i] * (v - centre)) ** 2
            if cost >= radius:
                break  # later candidates are farther from the centre
            c[i] = v
            if i == 0:
                radius, best = cost, c.copy()
            elif not visit(i - 1, cost):
                return False
        return True

    proven = visit(d - 1, 0.0)
    return best, radius, proven


def quant_optimum(W: torch.Tensor, H: torch.Tensor, bits: int, seeds: list[torch.Tensor],
                  node_limit: int):
    """(per-row optimal errors, proven mask) for quantization on fit_grid's per-row grid."""
    g = fit_grid(W, bits)
    Hn = H.numpy()
    opts, proven = [], []
    for r in range(W.shape[0]):
        s, z = float(g.scale[r]), float(g.zero[r])
        R = np.linalg.cholesky(Hn * s * s).T  # ‖R(c − t)‖² = (s(c − t))ᵀ H (s(c − t))
        t = W[r].numpy() / s
        start = min(seeds, key=lambda S: float((S[r] - W[r]) @ H @ (S[r] - W[r])))
        c0 = np.clip(np.round(start[r].numpy() / s), -z, 2**bits - 1 - z)
        _, val, ok = best_codes(t, R, -z, 2**bits - 1 - z, c0, node_limit)
        opts.append(0.5 * val)
        proven.append(ok)
    return np.array(opts), np.array(proven)


def prune_optimum(W: torch.Tensor, H: torch.Tensor, supports: list[tuple[int, ...]]) -> np.ndarray:
    """Per-row minimum over the given removed sets P of ½ w_Pᵀ ((H⁻¹)_PP)⁻¹ w_P."""
    Hinv = torch.linalg.inv(H)
    P = torch.tensor(supports)  # (S, k)
    A = Hinv[P[:, :, None], P[:, None, :]]  # (S, k, k)
    L = torch.linalg.cholesky(A)
    best = np.full(W.shape[0], np.inf)
    for r in range(W.shape[0]):
        wP = W[r][P]  # (S, k)
        z = torch.cholesky_solve(wP[:, :, None], L).squeeze(-1)
        best[r] = float((0.5 * (wP * z).sum(1)).min())
    return best


def nm_supports(d: int, n: int, m: int) -> list[tuple[int, ...]]:
    per_group = [tuple(g * m + i for i in drop)
                 for g in range(d // m) for drop in itertools.combinations(range(m), m - n)]
    groups = [per_group[g * math.comb(m, m - n):(g + 1) * math.comb(m, m - n)]
              for g in range(d // m)]
    return [sum(choice, ()) for choice in itertools.product(*groups)]


def gap(errors: torch.Tensor, opt: np.ndarray, keep: np.ndarray) -> str:
    e = errors.numpy()[keep].sum()
    o = opt[keep].sum()
    return f"{100 * (e / o - 1):.2f} %"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cols", default="12,16,20")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--node-limit", type=int, default=2_000_000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| cols | problem | proven rows | OBQ | GPTQ | fast | RTN | ExactOBS | SparseGPT | "
          "magnitude | time s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for d in (int(v) for v in args.cols.split(",")):
        W32, H = make_layer(args.rows, d, "cpu")
        W = W32.double()
        for b in (int(v) for v in args.bits.split(",")):
            t0 = time.perf_counter()
            res = {
                "OBQ": obq_quantize(W, H, b, damp=0.0),
                "GPTQ": gptq_quantize(W, H, b, damp=0.0),
                "fast": fast_quantize(W, H, b, damp=0.0),
                "RTN": rtn_quantize(W, b, H=H),
            }
            opt, ok = quant_optimum(W, H, b, [r.weight for r in res.values()], args.node_limit)
            cells = [gap(res[k].row_error, opt, ok) for k in ("OBQ", "GPTQ", "fast", "RTN")]
            print(f"| {d} | {b}-bit | {int(ok.sum())}/{len(ok)} | " + " | ".join(cells)
                  + f" | – | – | – | {time.perf_counter() - t0:.1f} |", flush=True)
        for name, supports, kw in (
            ("50 % per row", list(itertools.combinations(range(d), d // 2)), {"sparsity": 0.5}),
            ("2:4", nm_supports(d, 2, 4), {"n_m": (2, 4)}),
        ):
            t0 = time.perf_counter()
            opt = prune_optimum(W, H, supports)
            ok = np.ones_like(opt, dtype=bool)
            eobs = exact_obs_prune(W, H, damp=0.0, allocation="uniform", **kw)
            sgpt = sparsegpt_prune(W, H, damp=0.0, allocation="uniform", **kw)
            mag = magnitude_prune(W, per_row=True, H=H, **kw)
            cells = [gap(r.row_error, opt, ok) for r in (eobs, sgpt, mag)]
            print(f"| {d} | {name} ({len(supports)} supports) | {len(ok)}/{len(ok)} | – | – | – "
                  f"| – | " + " | ".join(cells) + f" | {time.perf_counter() - t0:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
