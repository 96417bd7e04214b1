"""Pruning vs quantization on our layers, at equal bits per weight (metadata included).

For every layer of a task (Hessians H = 2XᵀX/n from the task's calibration batches, as the layer
database captures them) the layer-wise relative error Σ_r ½(w−ŵ)H(w−ŵ)ᵀ / Σ_r ½ wHwᵀ of

* quantization at b = 2..8 bits per row: OBQ where rows·cols³ <= 1e10, GPTQ above (both with the
  symmetric MSE grid); cost (cols·b + scale + zero) / cols bits per weight;
* unstructured pruning at the density that costs the same b bits per weight, with the cost model of
  automl_compress/database/costs.py: a 1-bit mask per weight, kept values at 8 bits (quantized on
  the mask: GPTQ for cols <= 2048, round-to-nearest above) plus the row's scale and zero point, or
  kept values at 16 bits (no grid metadata); and the paper's accounting (16-bit values, mask not
  counted: density b/16). Masks: ExactOBS (one pass, all densities) where rows·cols³ <= 3e10,
  SparseGPT above, then CHITA refinement at sparsity >= 75 % (never worse than its warm start);
  layers wider than 4096 columns get per-row magnitude masks refined by CHITA at sparsity >= 75 %
  and no pruning figure below 75 % (CHITA needs no cols³ factorisation; SparseGPT does);

with each layer's excess kurtosis of the weights. The crossover is the budget (in quantization
bits b; pruning gets the same b + 32/cols bits per weight) below which pruning has the lower error
(log-error difference interpolated linearly between the budgets), "< 2" when quantization wins at
every budget and "> 8" when pruning does.

Subcommands (every result is saved per layer under --out, so a long run resumes where it stopped):

  python bench/prune_vs_quant.py layers --tasks digits_cnn,crepe_tiny,minilm_l6
  python bench/prune_vs_quant.py report --tasks digits_cnn,crepe_tiny,minilm_l6 --plot docs/p.png
  python bench/prune_vs_quant.py plans --tasks digits_cnn,crepe_tiny,minilm_l6 --budgets 2,2.5,3,4

``plans`` builds (or reuses) each task's layer database from configs/<task>.yaml, asks the DP
allocator for a plan at every budget and compares, layer by layer, whether the plan prunes (0-bit
rows or a sparse pattern) with whether the layer's crossover lies above the bits the plan gave it.
:func:`plans_vs_crossover` takes any mapping of plans, so evo or RL plans can be fed in the same
way.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from automl_compress.config import CostConfig, load_config
from automl_compress.database.costs import row_bits
from automl_compress.solvers import (
    exact_obs_prune,
    gptq_quantize,
    magnitude_prune,
    obq_quantize,
    rtn_quantize,
    sparsegpt_prune,
)
from automl_compress.solvers.chita import chita_prune
from automl_compress.solvers.hessian import row_errors
from automl_compress.solvers.result import SolveResult

QUANT_BITS = (2, 3, 4, 5, 6, 7, 8)
VALUE_BITS = (8, 16)
OBQ_MAX_WORK = 1e10  # rows · cols³ up to which OBQ (exact greedy) is used instead of GPTQ
EXACT_OBS_MAX_WORK = 3e10  # the same for ExactOBS masks (else SparseGPT)
GPTQ_VALUES_MAX_COLS = 2048  # kept 8-bit values quantized by GPTQ up to here, RTN above
CHITA_MIN_SPARSITY = 0.75
WIDE_COLS = 4096  # above: masks from magnitude + CHITA at sparsity >= 75 % only (no cols³ solve)
CONFIGS = {"digits_cnn": "configs/digits.yaml", "crepe_tiny": "configs/crepe_tiny.yaml",
           "minilm_l6": "configs/minilm.yaml"}


@dataclass(frozen=True)
class LayerProblem:
    """One layer: W (rows, cols) and its H (cols, cols), float64 on the CPU."""

    task: str
    name: str
    W: torch.Tensor
    H: torch.Tensor
    kernel_area: int
    n_samples: int


# ----------------------------------------------------------------------------------------------
# layers and Hessians (cached: a capture takes minutes on the larger tasks)


def layer_problems(task_name: str, out: Path) -> list[LayerProblem]:
    """Every compressible layer of the task with its Hessian, captured as the database does.

    Cached in ``out/hessians/<task>.pt``. Layers whose H is block-diagonal or grouped are skipped.
    """
    path = out / "hessians" / f"{task_name}.pt"
    if path.exists():
        data = torch.load(path, weights_only=True)
    else:
        from automl_compress.capture import capture_hessians
        from automl_compress.zoo import load_task

        cfg = load_config(CONFIGS[task_name])
        torch.manual_seed(cfg.seed)
        task = load_task(cfg.task)
        cap = cfg.capture
        batches = list(task.calib)[: cap.max_batches]
        hs = capture_hessians(
            task.model, batches, task.forward, include=cap.include, exclude=cap.exclude,
            max_dense_cols=cap.max_dense_cols, block_cols=cap.block_cols, centered=cap.centered,
        )
        mods = dict(task.model.named_modules())
        data = {}
        for name, h in hs.items():
            if h.blocked or h.groups != 1:
                print(f"skip {task_name}/{name}: block-diagonal or grouped H", flush=True)
                continue
            W = mods[name].weight.detach().flatten(1).to(torch.float64).contiguous()
            data[name] = {"W": W, "H": h.H[0].to(torch.float64).contiguous(),
                          "kernel_area": int(math.prod(h.info.kernel) if h.info.kernel else 1),
                          "n_samples": int(h.n_samples)}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, path)
    return [LayerProblem(task_name, n, d["W"], d["H"], int(d["kernel_area"]), int(d["n_samples"]))
            for n, d in data.items()]


# ----------------------------------------------------------------------------------------------
# one layer


def excess_kurtosis(W: torch.Tensor) -> float:
    """E[(w − μ)⁴] / E[(w − μ)²]² − 3 over all weights of the tensor."""
    x = W.double().flatten()
    x = x - x.mean()
    m2 = float((x * x).mean())
    return float((x**4).mean()) / (m2 * m2) - 3.0 if m2 > 0 else 0.0


def kept_for_budget(cols: int, budget: float, value_bits: int, paper: bool = False) -> int:
    """Weights a row may keep so that the row costs at most ``budget`` bits per weight.

    Ours: mask (1 bit per weight) + kept values + the row's scale and zero point when the values
    are quantized (value_bits < 16), checked against costs.row_bits. The paper's: 16-bit values
    only (density budget / 16).
    """
    if paper:
        return min(cols, int(math.floor(budget * cols / 16 + 1e-9)))
    cost = CostConfig() if value_bits < 16 else CostConfig(scale_bits=0, zero_bits=0)
    meta = cost.scale_bits + cost.zero_bits
    k = int(math.floor((budget * cols - cols - meta) / value_bits + 1e-9))
    k = max(0, min(cols, k))
    if 0 < k < cols:
        pattern = f"{100.0 * (cols - k) / cols:.9f}%"
        assert row_bits(cols, value_bits, pattern, cost) <= budget * cols + 1e-6
    return k


def _rel(res, energy: float) -> float:
    return float(res.row_error.sum()) / energy


def _quantize_values(p: LayerProblem, pr, bits: int):
    """Kept weights of a pruning result quantized to ``bits`` (pruned ones stay 0); the error is
    against the dense W."""
    if p.W.shape[1] <= GPTQ_VALUES_MAX_COLS:
        W_hat = gptq_quantize(pr.weight, p.H, bits, mask=pr.mask).weight
    else:
        W_hat = torch.where(pr.mask, rtn_quantize(pr.weight, bits).weight, 0.0)
    return SolveResult(W_hat, row_errors(p.W, W_hat, p.H), mask=pr.mask)


def _prune_entry(p: LayerProblem, acc: str, k: int, masks: dict, energy: float) -> dict:
    """One accounting's pruning result at ``k`` kept weights per row."""
    cols = p.W.shape[1]
    if k <= 0:
        return {"kept": k, "error": 1.0, "solver": "all pruned"}
    if k >= cols:
        return {"kept": k, "error": None, "solver": "dense fits"}
    pr, name = masks[k]
    if pr is None:
        return {"kept": k, "density": k / cols, "error": None, "solver": name}
    if acc == "8bit":
        pr = _quantize_values(p, pr, 8)
    return {"kept": k, "density": k / cols, "error": _rel(pr, energy), "solver": name}


def study_layer(p: LayerProblem) -> dict:
    """Errors of quantization and pruning at every budget for one layer (see the module doc)."""
    W, H = p.W, p.H
    rows, cols = W.shape
    energy = float(0.5 * ((W @ H) * W).sum())
    work = rows * cols**3
    t0 = time.process_time()
    qmethod = "obq" if work <= OBQ_MAX_WORK else "gptq"
    quant = {}
    for b in QUANT_BITS:
        fn = obq_quantize if qmethod == "obq" else gptq_quantize
        quant[str(b)] = {"bits_per_weight": (cols * b + 32) / cols, "error": _rel(fn(W, H, b),
                                                                                     energy)}
    # the densities every accounting asks for, one mask per distinct kept count
    # pruning gets exactly the bits the b-bit quantization costs (its scale and zero included)
    wanted: dict[str, dict[str, int]] = {}
    for b in QUANT_BITS:
        bpw = quant[str(b)]["bits_per_weight"]
        for vb in VALUE_BITS:
            wanted.setdefault(f"{vb}bit", {})[str(b)] = kept_for_budget(cols, bpw, vb)
        wanted.setdefault("paper", {})[str(b)] = kept_for_budget(cols, b, 16, paper=True)
    ks = sorted({k for d in wanted.values() for k in d.values() if 0 < k < cols})
    sparsities = [1.0 - k / cols for k in ks]
    pmethod = "exact_obs" if work <= EXACT_OBS_MAX_WORK else "sparsegpt"
    if cols > WIDE_COLS:
        pmethod = "magnitude"
    masks = {}
    if pmethod == "exact_obs" and sparsities:
        masks = dict(zip(ks, exact_obs_prune(W, H, sparsity=sparsities), strict=True))
    for k, s in zip(ks, sparsities, strict=True):
        if pmethod == "magnitude" and s < CHITA_MIN_SPARSITY:
            masks[k] = (None, "not computed (wide layer, low sparsity)")
            continue
        if pmethod == "magnitude":
            pr = magnitude_prune(W, s, per_row=True, H=H)
        else:
            pr = masks[k] if k in masks else sparsegpt_prune(W, H, sparsity=s)
        name = pmethod
        if s >= CHITA_MIN_SPARSITY:
            pr = chita_prune(W, H, warm_start=pr)
            name = f"chita<-{pmethod}"
        masks[k] = (pr, name)
    prune = {acc: {b: _prune_entry(p, acc, k, masks, energy) for b, k in per_b.items()}
             for acc, per_b in wanted.items()}
    return {
        "task": p.task, "layer": p.name, "rows": rows, "cols": cols, "n_samples": p.n_samples,
        "kurtosis": excess_kurtosis(W), "quant_method": qmethod, "prune_method": pmethod,
        "quant": quant, "prune": prune, "cpu_seconds": round(time.process_time() - t0, 1),
    }


# ----------------------------------------------------------------------------------------------
# crossover


def pruning_errors(rec: Mapping, accounting: str = "8bit") -> dict[int, float]:
    """Pruning error at every budget b: the best computed mask that fits b (a budget can always
    hold a sparser mask, so the curve is made non-increasing); inf where none was computed."""
    out, best = {}, math.inf
    for b in QUANT_BITS:
        e = rec["prune"][accounting][str(b)]["error"]
        best = min(best, math.inf if e is None else e)
        out[b] = best
    return out


def crossover(rec: Mapping, accounting: str = "8bit") -> float:
    """Budget b (quantization bits) below which pruning has the lower error.

    Both cost the same bits at every b (b + 32/cols per weight; the paper's accounting: b). The
    log-ratio of the errors (pruning: :func:`pruning_errors`) is interpolated linearly in b between
    the budgets; the highest sign change counts. Returns -inf when quantization wins everywhere in
    2..8 and +inf when pruning does.
    """
    pe = pruning_errors(rec, accounting)
    bs, diff = [], []
    for b in QUANT_BITS:
        q = rec["quant"][str(b)]["error"]
        bs.append(float(b))
        diff.append(math.log(max(pe[b], 1e-300)) - math.log(max(q, 1e-300)))
    if all(d > 0 for d in diff):
        return -math.inf
    if all(d <= 0 for d in diff):
        return math.inf
    for i in range(len(bs) - 1, 0, -1):
        if diff[i] > 0 >= diff[i - 1]:
            if math.isinf(diff[i]):
                return bs[i - 1]
            t = diff[i - 1] / (diff[i - 1] - diff[i])
            return bs[i - 1] + t * (bs[i] - bs[i - 1])
    return -math.inf


def _fmt_cross(x: float) -> str:
    return "< 2" if x == -math.inf else ("> 8" if x == math.inf else f"{x:.2f}")


def _load(out: Path, tasks: Sequence[str]) -> list[dict]:
    recs = []
    for t in tasks:
        f = out / "prune_vs_quant" / f"{t}.json"
        if f.exists():
            recs.extend(json.loads(f.read_text()).values())
    return recs


# ----------------------------------------------------------------------------------------------
# plans


def _layer_avg_bits(table, lp, cost) -> float:
    from automl_compress.database.knapsack import pattern_index

    ob = table.option_bits(cost)[pattern_index(table, lp.pattern)]
    idx = np.searchsorted(np.asarray(table.bits), np.asarray(lp.row_bits))
    return float(ob[idx].sum()) / table.info.numel


def plans_vs_crossover(
    plans: Mapping[str, object],
    tables: Sequence,
    crossovers: Mapping[str, float],
    cost: CostConfig | None = None,
) -> list[dict]:
    """Per plan and layer: what the plan does and whether the layer's crossover says to prune.

    Args:
        plans: label -> CompressionPlan (dp, evo, RL, ... any allocator's output).
        tables: the database's LayerTables the plans were made from.
        crossovers: layer name -> crossover budget (bits per weight, see :func:`crossover`).
        cost: size accounting (default CostConfig()).

    Returns:
        One dict per (plan, layer): ``bits`` (the layer's average bits per weight in the plan,
        metadata included), ``pattern``, ``zero_rows`` (fraction of 0-bit rows), ``prunes``
        (0-bit rows or a sparse pattern), ``crossover`` and ``pruning_wins`` (bits < crossover),
        and ``agree`` (prunes == pruning_wins).
    """
    out = []
    for label, plan in plans.items():
        for t in tables:
            lp = plan.layers[t.info.name]
            bits = _layer_avg_bits(t, lp, cost)
            zero = sum(1 for b in lp.row_bits if b == 0) / len(lp.row_bits)
            prunes = zero > 0 or lp.pattern != "dense"
            cx = crossovers.get(t.info.name)
            wins = None if cx is None else bool(bits < cx)
            out.append({
                "plan": label, "layer": t.info.name, "bits": round(bits, 3),
                "pattern": lp.pattern, "zero_rows": round(zero, 4), "prunes": prunes,
                "crossover": cx, "pruning_wins": wins,
                "agree": None if wins is None else prunes == wins,
            })
    return out


# ----------------------------------------------------------------------------------------------
# commands


def cmd_layers(args) -> None:
    torch.set_num_threads(args.threads)
    for task in args.tasks.split(","):
        f = args.out / "prune_vs_quant" / f"{task}.json"
        for p in layer_problems(task, args.out):
            done = json.loads(f.read_text()) if f.exists() else {}  # re-read: runs may overlap
            if p.name in done or (args.layers and p.name not in args.layers.split(",")):
                continue
            rec = study_layer(p)
            done = json.loads(f.read_text()) if f.exists() else {}
            done[p.name] = rec
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(done, indent=1))
            print(f"{task}/{p.name} {tuple(p.W.shape)} kurt={rec['kurtosis']:.2f} "
                  f"cross={_fmt_cross(crossover(rec))} {rec['cpu_seconds']} s", flush=True)


def cmd_report(args) -> None:
    from scipy.stats import spearmanr

    recs = _load(args.out, args.tasks.split(","))
    dead = {}
    for t in args.tasks.split(","):
        for p in layer_problems(t, args.out):
            dg = torch.diagonal(p.H)
            dead[(t, p.name)] = float((dg <= 1e-12 * dg.max()).double().mean())
    print("| task | layer | rows x cols | n | dead inputs | kurtosis | quant | prune | "
          + " | ".join(f"q{b} / p{b}" for b in (2, 3, 4, 6)) + " | crossover | paper's |")
    print("|" + "---|" * 14)
    xs, ks, xp = [], [], []
    for r in recs:
        cx, cp = crossover(r), crossover(r, "paper")
        xs.append(cx)
        xp.append(cp)
        ks.append(r["kurtosis"])
        cells = []
        pes = pruning_errors(r)
        for b in (2, 3, 4, 6):
            q = r["quant"][str(b)]["error"]
            pe = pes[b]
            cells.append(f"{q:.3g} / {'-' if math.isinf(pe) else f'{pe:.3g}'}")
        r["dead"] = dead.get((r["task"], r["layer"]), 0.0)
        short = r["layer"].replace("bert.encoder.", "")
        print(f"| {r['task']} | {short} | {r['rows']}x{r['cols']} | {r['n_samples']} "
              f"| {100 * r['dead']:.0f} % | {r['kurtosis']:.2f} | "
              f"{r['quant_method']} | {r['prune_method']} | " + " | ".join(cells)
              + f" | {_fmt_cross(cx)} | {_fmt_cross(cp)} |")
    finite = lambda v: [min(max(x, 1.5), 8.5) for x in v]  # noqa: E731 (censored: < 2, > 8)
    rho, pv = spearmanr(ks, finite(xs))
    rho_p, pv_p = spearmanr(ks, finite(xp))
    n_q = sum(1 for x in xs if x == -math.inf)
    print(f"\nlayers: {len(recs)}; quantization wins at every budget 2..8 on {n_q}; "
          f"crossover median {np.median(finite(xs)):.2f} bits (ours), "
          f"{np.median(finite(xp)):.2f} (paper's accounting)")
    print(f"Spearman(kurtosis, crossover): ours rho={rho:.3f} p={pv:.3g}; "
          f"paper's accounting rho={rho_p:.3f} p={pv_p:.3g}")
    full = [(k, x) for r, k, x in zip(recs, ks, finite(xs), strict=True)
            if r["n_samples"] >= r["cols"] and r["dead"] < 0.05]
    if len(full) > 2 and len({x for _, x in full}) > 1:
        rf, pf = spearmanr([k for k, _ in full], [x for _, x in full])
        print(f"  full-rank layers only (n >= cols, < 5 % dead inputs): {len(full)} layers, "
              f"{sum(1 for _, x in full if x > 2)} with a crossover, rho={rf:.3f} p={pf:.3g}")
    elif full:
        print(f"  full-rank layers only (n >= cols, < 5 % dead inputs): {len(full)} layers, "
              f"{sum(1 for _, x in full if x > 2)} with a crossover in 2..8 bits")
    for t in args.tasks.split(","):
        sub = [(k, x) for r, k, x in zip(recs, ks, finite(xs), strict=True) if r["task"] == t]
        if len(sub) > 2 and len({x for _, x in sub}) > 1:
            rt, pt = spearmanr([k for k, _ in sub], [x for _, x in sub])
            print(f"  {t}: {len(sub)} layers, rho={rt:.3f} p={pt:.3g}")
    if args.plot:
        _plot(recs, xs, ks, args.plot)


def _plot(recs, xs, ks, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"digits_cnn": "tab:green", "crepe_tiny": "tab:orange", "minilm_l6": "tab:blue"}
    for r in recs:
        c = colors.get(r["task"], "k")
        q = [r["quant"][str(b)]["error"] for b in QUANT_BITS]
        pe = pruning_errors(r)
        p = [pe[b] for b in QUANT_BITS]
        ax1.plot(QUANT_BITS, q, "-", color=c, alpha=0.35, lw=1)
        ax1.plot(QUANT_BITS, [np.nan if math.isinf(v) or v <= 0 else v for v in p], "--",
                 color=c, alpha=0.35, lw=1)
    ax1.set_yscale("log")
    ax1.set_xlabel("bits per weight (metadata included)")
    ax1.set_ylabel("relative layer error")
    ax1.set_title("solid: quantization, dashed: pruning (mask + 8-bit values)")
    for t, c in colors.items():
        ax1.plot([], [], color=c, label=t)
    ax1.legend(fontsize=8)
    fx = [min(max(x, 1.5), 8.5) for x in xs]
    for r, k, x in zip(recs, ks, fx, strict=True):
        ax2.scatter(k, x, color=colors.get(r["task"], "k"), s=14)
    ax2.set_xscale("symlog", linthresh=1.0)
    ax2.axhline(2, color="grey", lw=0.5)
    ax2.set_xlabel("excess kurtosis of the weights")
    ax2.set_ylabel("crossover bits (1.5 = quantization always wins)")
    ax2.set_title("crossover vs kurtosis")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def cmd_plans(args) -> None:
    from automl_compress.pipeline import allocate, prepare

    torch.set_num_threads(args.threads)
    recs = {(r["task"], r["layer"]): r for r in _load(args.out, args.tasks.split(","))}
    result = {}
    tag = "" if not args.set else "_" + hashlib.sha1(repr(args.set).encode()).hexdigest()[:8]
    for task in args.tasks.split(","):
        cfg = load_config(CONFIGS[task], args.set)
        prepared = prepare(cfg, args.out / "pvq_runs" / (task + tag),
                           db_dir=args.out / "pvq_db" / (task + tag), progress=False)
        cross = {n: crossover(r) for (t, n), r in recs.items() if t == task}
        plans = {}
        for b in (float(x) for x in args.budgets.split(",")):
            try:
                plans[f"dp@{b:g}"] = allocate(prepared, "dp", b)
            except Exception as exc:  # an infeasible budget for this menu: say so, go on
                print(f"{task} dp@{b:g}: {type(exc).__name__}: {exc}")
        rows = plans_vs_crossover(plans, prepared.tables, cross, cfg.cost)
        result[task] = rows
        print(f"\n{task} (menu bits {list(cfg.menu.bits)}, patterns {list(cfg.menu.patterns)}, "
              f"solver {cfg.solver.quant}/{cfg.solver.prune})")
        for label in plans:
            sub = [r for r in rows if r["plan"] == label]
            known = [r for r in sub if r["crossover"] is not None]
            pr = [r for r in sub if r["prunes"]]
            wins = [r for r in known if r["pruning_wins"]]
            agree = [r for r in known if r["agree"]]
            cx = lambda r: "n/a" if r["crossover"] is None else _fmt_cross(r["crossover"])  # noqa: E731
            print(f"  {label}: prunes (0-bit rows or a sparse pattern) in {len(pr)}/{len(sub)} "
                  f"layers; crossover known for {len(known)}, above the layer's bits for "
                  f"{len(wins)} ({', '.join(r['layer'] for r in wins) or '-'}); plan and "
                  f"crossover agree on {len(agree)}/{len(known)}")
            for r in pr:
                print(f"    {r['layer']}: {r['pattern']}, {100 * r['zero_rows']:.0f} % 0-bit rows, "
                      f"{r['bits']:.2f} bits/weight, crossover {cx(r)}")
    f = args.out / "prune_vs_quant" / f"plans{tag}.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(result, indent=1, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("layers", "report", "plans"):
        s = sub.add_parser(name)
        s.add_argument("--tasks", default="digits_cnn,crepe_tiny,minilm_l6")
        s.add_argument("--out", type=Path, default=Path("bench_out"))
        s.add_argument("--threads", type=int, default=1)
        if name == "layers":
            s.add_argument("--layers", default="", help="only these layer names (comma list)")
        if name == "report":
            s.add_argument("--plot", default="", help="write the PNG here")
        if name == "plans":
            s.add_argument("--budgets", default="2,2.5,3,4")
            s.add_argument("--set", action="append", default=[],
                           help="config override key=value (repeatable), e.g. "
                           "'menu.patterns=[dense,2:4,75%%,87.5%%]'")
    args = ap.parse_args()
    {"layers": cmd_layers, "report": cmd_report, "plans": cmd_plans}[args.cmd](args)


if __name__ == "__main__":
    main()
