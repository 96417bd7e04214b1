"""Speed and error of the pruning solvers (ExactOBS, SparseGPT, exact re-solve, CHITA).

Default mode, synthetic layers: inputs are correlated, X = Z·A with A = I + 0.7·G/√cols (Z, G
standard normal), H = 2XᵀX/n, n = 4·cols; W is standard normal. Errors are layer errors
Σ_r 0.5·(w−ŵ)H(w−ŵ)ᵀ, reported relative to the dense output energy Σ_r 0.5·w H wᵀ.

Run:  OMP_NUM_THREADS=1 python bench/pruning_solvers.py --shapes 128x256,128x512
(one thread gives stable CPU timings on a shared machine; on a GPU pass --device cuda).

``--chita``: magnitude, SparseGPT, ExactOBS, CHITA-from-SparseGPT and CHITA-from-ExactOBS at
50/70/90/95 % and 2:4, on bench/solvers.py's anchor protocol (``--shapes``, first ``--max-rows``
rows) and on real layers (``--real task:layer,...``, Hessians from the task's calibration batches,
cached by bench/prune_vs_quant.py). Errors ×10³ relative to the output energy, CPU seconds of this
process (``time.process_time``, one thread: robust to other load on a shared machine), median of
``--repeats`` interleaved runs. A CHITA time includes its warm start's. ExactOBS runs one
single-level call per level (its greedy pass goes to full sparsity whatever the level). Results
append to ``--out`` (JSON lines; finished rows are skipped when re-run).

Run:  taskset -c 0 python bench/pruning_solvers.py --chita --shapes 256x256,512x512 --max-rows 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from automl_compress.solvers import exact_obs_prune, magnitude_prune, sparsegpt_prune
from automl_compress.solvers.chita import chita_prune
from automl_compress.solvers.lstsq import resolve_on_mask

CHITA_LEVELS = ("50%", "70%", "90%", "95%", "2:4")
CHITA_METHODS = ("magnitude", "sparsegpt", "exact_obs", "chita<-sparsegpt", "chita<-exact_obs")


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


def _level_kwargs(level: str, kernel_area: int) -> dict:
    if level == "2:4":
        return {"n_m": (2, 4), "kernel_area": kernel_area}
    return {"sparsity": float(level.rstrip("%")) / 100}


def _cpu_timed(fn, device: str):
    """(result, seconds): CPU seconds of this process, or wall seconds on CUDA (synchronised)."""
    if device == "cuda":
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, time.perf_counter() - t
    t = time.process_time()
    out = fn()
    return out, time.process_time() - t


def chita_row(
    W, H, level: str, kernel_area: int, repeats: int, device: str, options: dict | None = None
) -> dict:
    """Error (×10³ of the output energy) and median time of every method at one level."""
    kw = _level_kwargs(level, kernel_area)
    dense = float(0.5 * ((W.double() @ H.double()) * W.double()).sum())
    mkw = {"n_m": (2, 4)} if "n_m" in kw else {"sparsity": kw["sparsity"]}
    times: dict[str, list[float]] = {m: [] for m in CHITA_METHODS}
    res: dict = {}
    for _ in range(repeats):  # interleaved: each repeat runs every method once
        res["magnitude"], t = _cpu_timed(lambda: magnitude_prune(W, H=H, **mkw), device)
        times["magnitude"].append(t)
        res["sparsegpt"], t = _cpu_timed(lambda: sparsegpt_prune(W, H, **kw), device)
        times["sparsegpt"].append(t)
        res["exact_obs"], t = _cpu_timed(lambda: exact_obs_prune(W, H, **kw), device)
        times["exact_obs"].append(t)
        for warm in ("sparsegpt", "exact_obs"):
            name = f"chita<-{warm}"
            res[name], t = _cpu_timed(
                lambda warm=warm: chita_prune(W, H, warm_start=res[warm], **kw, **(options or {})),
                device,
            )
            times[name].append(t + times[warm][-1])
    out = {"level": level}
    for m in CHITA_METHODS:
        out[f"{m}_err"] = round(res[m].error / dense * 1e3, 4)
        out[f"{m}_s"] = round(statistics.median(times[m]), 3)
    for warm in ("sparsegpt", "exact_obs"):
        sw = res[f"chita<-{warm}"].info["swaps"].double()
        out[f"chita<-{warm}_swaps_mean"] = round(float(sw.mean()), 2)
        out[f"chita<-{warm}_reverted_rows"] = res[f"chita<-{warm}"].info["reverted_rows"]
    eo = out["exact_obs_err"]
    out["chita_eo/eo"] = round(out["chita<-exact_obs_err"] / eo, 4)
    out["chita_sg/eo"] = round(out["chita<-sparsegpt_err"] / eo, 4)
    out["t_chita_sg/t_eo"] = round(out["chita<-sparsegpt_s"] / out["exact_obs_s"], 3)
    return out


def _problems(args):
    """(label, W, H, kernel_area) of every requested synthetic shape and real layer."""
    if args.shapes:
        from solvers import make_layer  # bench/solvers.py: the anchors' data protocol

        for spec in args.shapes.split(","):
            rows, cols = (int(v) for v in spec.split("x"))
            W, H = make_layer(rows, cols, args.device)
            W = W[: args.max_rows].double().contiguous() if args.max_rows else W.double()
            yield f"{spec} (anchor)", W, H, 1
    if args.real:
        from prune_vs_quant import layer_problems

        wanted: dict[str, list[str]] = {}
        for item in args.real.split(","):
            task, layer = item.split(":", 1)
            wanted.setdefault(task, []).append(layer)
        for task, layers in wanted.items():
            probs = {p.name: p for p in layer_problems(task, args.hessians)}
            for layer in layers:
                p = probs[layer]
                W = p.W[: args.max_rows].contiguous() if args.max_rows else p.W
                yield f"{task}:{layer} {p.W.shape[0]}x{p.W.shape[1]}", W.to(args.device), \
                    p.H.to(args.device), p.kernel_area


def main_chita(args) -> None:
    torch.set_num_threads(args.threads)
    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["layer"], r["rows"], r["level"], json.dumps(r.get("options", {}))))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    options = json.loads(args.chita_options)
    for label, W, H, ka in _problems(args):
        for level in args.levels.split(","):
            key = (label, W.shape[0], level, json.dumps(options))
            if key in done:
                continue
            try:
                row = chita_row(W, H, level, ka, args.repeats, args.device, options)
            except ValueError as exc:  # e.g. 2:4 on a layer with one input channel
                print(f"{label} {level}: skipped ({type(exc).__name__}: {exc})", flush=True)
                continue
            row = {"layer": label, "rows": W.shape[0], "repeats": args.repeats, **row}
            if options:
                row["options"] = options
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


def print_table(path: Path) -> None:
    """The markdown table of a --chita results file, with the two goals checked per row."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    short = {"magnitude": "mag", "sparsegpt": "SG", "exact_obs": "EO", "chita<-sparsegpt": "C←SG",
             "chita<-exact_obs": "C←EO"}
    print("| layer (rows) | level | repeats, options | " + " | ".join(
        f"{short[m]} err" for m in CHITA_METHODS) + " | " + " | ".join(
        f"{short[m]} s" for m in CHITA_METHODS[1:]) + " | C←EO/EO | C←SG/EO | t(C←SG)/t(EO) |")
    print("|" + "---|" * (3 + len(CHITA_METHODS) * 2 - 1 + 3))
    for r in rows:
        opt = str(r.get("repeats", 3))
        if r.get("options"):
            opt += " " + json.dumps(r["options"])
        print(f"| {r['layer']} ({r['rows']}) | {r['level']} | {opt} | "
              + " | ".join(f"{r[m + '_err']:.4g}" for m in CHITA_METHODS) + " | "
              + " | ".join(f"{r[m + '_s']:.3g}" for m in CHITA_METHODS[1:])
              + f" | {r['chita_eo/eo']:.4f} | {r['chita_sg/eo']:.4f}"
              f" | {r['t_chita_sg/t_eo']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="128x256,128x512")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--chita", action="store_true", help="the CHITA comparison table")
    ap.add_argument("--table", action="store_true", help="with --chita: print --out as a table")
    ap.add_argument("--levels", default=",".join(CHITA_LEVELS))
    ap.add_argument("--max-rows", type=int, default=None, help="solve only the first N rows")
    ap.add_argument("--real", default="", help="task:layer,... real layers (with --chita)")
    ap.add_argument("--chita-options", default="{}",
                    help='extra chita_prune keywords as JSON, e.g. \'{"iht_iters": 0}\'')
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hessians", type=Path, default=Path("bench_out"),
                    help="where bench/prune_vs_quant.py caches the captured Hessians")
    ap.add_argument("--out", type=Path, default=Path("bench_out/pruning_solvers/chita.jsonl"))
    args = ap.parse_args()
    if args.chita and args.table:
        print_table(args.out)
        return
    if args.chita:
        main_chita(args)
        return
    for spec in args.shapes.split(","):
        rows, cols = (int(v) for v in spec.split("x"))
        print(json.dumps(bench_shape(rows, cols, args.device)), flush=True)


if __name__ == "__main__":
    main()
