"""Benchmark of the search: RL (hierarchical, flat) vs HAQ-style DDPG vs DP vs uniform vs RTN.

For each task config and budget: the non-RL allocators once, each learned method over several
seeds (true metric mean ± std), with avg_bits, wall time and env steps; the learned channel
controller against the exact per-row knapsack on the proxy error (both at the DP's layer
budgets); the env step time on the database path. ``--transfer SRC DST`` runs the transfer table
(zero-shot, fine-tuned with 10 % of the steps, a fresh run with those steps, and DP).

Usage (the database of each task is built once under OUT/db_<task> and reused):

    python bench/search.py --config configs/digits.yaml --budgets 4 3 2.5 --seeds 0 1 2
    python bench/search.py --config configs/crepe_tiny.yaml --budgets 4 3 2.5
    python bench/search.py --transfer configs/digits.yaml configs/digits_wide.yaml --budgets 3

Writes OUT/search_<task>_b<budgets>.json, every plan it reports under OUT/plans/ (for
``bench/fresh_split.py``), and prints markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from automl_compress import pipeline
from automl_compress.agents.callbacks import Progress
from automl_compress.agents.hierarchical import Search
from automl_compress.config import Config, load_config
from automl_compress.database.allocate import plan_avg_bits, plan_error
from automl_compress.envs import CompressionEnv
from automl_compress.io import atomic_write_json

LEARNED = {
    "rl-hier": {"form": "hierarchical"},
    "rl-flat": {"form": "flat"},
    "rl-hier-knapsack": {"form": "hierarchical", "channel_controller": "knapsack"},
    "haq-ddpg": {"form": "haq"},
}


def _with(cfg: Config, budget: float, seed: int, steps: int, **agent: Any) -> Config:
    return dataclasses.replace(
        cfg, seed=seed, env=dataclasses.replace(cfg.env, budget_bits=float(budget)),
        agent=dataclasses.replace(cfg.agent, total_steps=steps, **agent))


def _prepare(cfg: Config, out: Path) -> pipeline.Prepared:
    db = out / f"db_{cfg.task.name}"
    return pipeline.prepare(cfg, out, db_dir=db, progress=False)


def learned_run(prepared: pipeline.Prepared, cfg: Config, models=None,
                steps: int | None = None) -> tuple[dict[str, Any], Search]:
    """Train (``steps`` env steps) and return the best plan's row and the search."""
    t0 = time.perf_counter()
    steps = cfg.agent.total_steps if steps is None else steps
    search = Search(prepared.tables, cfg, lambda p: pipeline.evaluate_plan(prepared, p),
                    prepared.dense_metric(), progress=Progress(max(steps, 1)), models=models)
    if steps > 0:
        search.train(steps)
    if steps == 0:
        search.cfg = dataclasses.replace(cfg, agent=dataclasses.replace(cfg.agent,
                                                                        final_candidates=1))
    search.final_candidates()
    best = search.tracker.best
    assert best is not None
    return {"metric": best.metric, "avg_bits": plan_avg_bits(best.plan, prepared.tables,
                                                             cfg.cost),
            "proxy_error": plan_error(best.plan, prepared.tables),
            "wall_seconds": time.perf_counter() - t0, "env_steps": search.progress.steps,
            "metric_evaluations": search.oracle.evaluations if search.oracle else 0}, search


def baseline_run(prepared: pipeline.Prepared, method: str, budget: float,
                 save: Path | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    plan = pipeline.allocate(prepared, method, budget)
    if save is not None:
        plan.save(save)
    value = pipeline.evaluate_plan(prepared, plan)
    tables = prepared.tables_for(plan)
    return {"metric": value, "avg_bits": plan_avg_bits(plan, tables, prepared.cfg.cost),
            "proxy_error": plan_error(plan, tables), "wall_seconds": time.perf_counter() - t0,
            "env_steps": 0}


def channel_vs_knapsack(prepared: pipeline.Prepared, cfg: Config, search: Search) -> dict:
    """Proxy error of the learned channel controller vs the exact knapsack, at DP layer budgets."""
    model = search.models.get("channel_controller")
    if model is None:
        return {}
    env = CompressionEnv(prepared.tables, cfg, mode="channel", layer_policy="dp")
    obs, _ = env.reset(seed=0)
    while True:
        a, _ = model.predict(obs, action_masks=env.action_masks(), deterministic=True)
        obs, _, done, _, info = env.step(a)
        if done:
            learned = info["compression"].proxy_error
            break
    dp_plan = pipeline.allocate(prepared, "dp", cfg.env.budget_bits)
    return {"learned_channel_proxy": learned, "knapsack_proxy": plan_error(dp_plan,
                                                                           prepared.tables),
            "ratio": learned / max(plan_error(dp_plan, prepared.tables), 1e-30)}


def step_time(prepared: pipeline.Prepared, cfg: Config, episodes: int = 50) -> float:
    """Mean seconds per env step (flat env, masked random actions, no metric)."""
    env = CompressionEnv(prepared.tables, cfg, mode="flat")
    rng = np.random.default_rng(0)
    n, t0 = 0, time.perf_counter()
    for _ in range(episodes):
        env.reset(seed=0)
        done = False
        while not done:
            a = int(rng.choice(np.flatnonzero(env.action_masks())))
            done = env.step(a)[2]
            n += 1
    return (time.perf_counter() - t0) / n


def _agg(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": rows}
    for k in ("metric", "avg_bits", "proxy_error", "wall_seconds", "env_steps"):
        vals = [float(r[k]) for r in rows]
        out[k] = statistics.fmean(vals)
        out[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return out


def bench_task(cfg: Config, out: Path, budgets: list[float], seeds: list[int], steps: int,
               methods: list[str]) -> dict[str, Any]:
    prepared = _prepare(cfg, out)
    result: dict[str, Any] = {"task": cfg.task.name, "metric_dense": prepared.dense_metric(),
                              "steps": steps, "budgets": {}}
    result["step_seconds"] = step_time(prepared, _with(cfg, budgets[0], 0, steps))
    for b in budgets:
        row: dict[str, Any] = {}
        for m in ("dp", "uniform", "rtn"):
            try:
                row[m] = baseline_run(prepared, m, b,
                                      out / "plans" / f"{cfg.task.name}_b{b:g}_{m}.json")
            except Exception as exc:  # noqa: BLE001 - an infeasible baseline is a table entry
                row[m] = {"error": str(exc)}
        for name in methods:
            runs = []
            for s in seeds:
                r, search = learned_run(prepared, _with(cfg, b, s, steps, **LEARNED[name]))
                search.tracker.best.plan.save(out / "plans" / f"{cfg.task.name}_b{b:g}_{name}"
                                                              f"_s{s}.json")
                if name == "rl-hier":
                    r.update(channel_vs_knapsack(prepared, search.cfg, search))
                search.close()
                runs.append(r)
                print(f"{cfg.task.name} b={b} {name} seed={s}: {r['metric']:.4f}", flush=True)
            row[name] = _agg(runs)
        result["budgets"][str(b)] = row
    return result


def bench_transfer(src: Config, dst: Config, out: Path, budget: float, steps: int,
                   seed: int) -> dict[str, Any]:
    src_p, dst_p = _prepare(src, out), _prepare(dst, out)
    _, trained = learned_run(src_p, _with(src, budget, seed, steps))
    ft = max(steps // 10, 1)
    cfg = _with(dst, budget, seed, ft)
    res: dict[str, Any] = {"src": src.task.name, "dst": dst.task.name, "budget": budget,
                           "steps": steps, "finetune_steps": ft}
    res["zero_shot"], s0 = learned_run(dst_p, cfg, models=dict(trained.models), steps=0)
    s0.close()
    res["finetuned"], s1 = learned_run(dst_p, cfg, models=dict(trained.models), steps=ft)
    s1.close()
    res["fresh"], s2 = learned_run(dst_p, cfg, steps=ft)
    s2.close()
    res["dp"] = baseline_run(dst_p, "dp", budget)
    trained.close()
    return res


def _table(result: dict[str, Any]) -> str:
    lines = [f"### {result['task']} (dense {result['metric_dense']:.4f}, {result['steps']} env "
             f"steps per learned run, env step {result['step_seconds'] * 1e3:.3f} ms)", "",
             "| budget | method | metric | avg_bits | proxy error | wall s | env steps |",
             "|---|---|---|---|---|---|---|"]
    for b, row in result["budgets"].items():
        for m, r in row.items():
            if "error" in r:
                lines.append(f"| {b} | {m} | infeasible: {r['error'][:60]} | | | | |")
                continue
            std = f" ± {r['metric_std']:.4f}" if "metric_std" in r else ""
            lines.append(f"| {b} | {m} | {r['metric']:.4f}{std} | {r['avg_bits']:.3f} | "
                         f"{r['proxy_error']:.4g} | {r['wall_seconds']:.1f} | "
                         f"{int(r['env_steps'])} |")
    lines += ["", "Learned channel controller vs the exact per-row knapsack, both at the DP's "
              "layer budgets (proxy error, per seed):", ""]
    for b, row in result["budgets"].items():
        runs = row.get("rl-hier", {}).get("runs", [])
        pairs = ", ".join(f"{r['learned_channel_proxy']:.4g} vs {r['knapsack_proxy']:.4g} "
                          f"({r['ratio']:.1f}x)" for r in runs if "ratio" in r)
        if pairs:
            lines.append(f"- budget {b}: {pairs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--transfer", nargs=2, metavar=("SRC", "DST"))
    ap.add_argument("--budgets", type=float, nargs="+", default=[4.0, 3.0, 2.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="env steps per learned run")
    ap.add_argument("--methods", nargs="+", default=list(LEARNED), choices=list(LEARNED))
    ap.add_argument("--out", default="bench_out/search")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.transfer:
        src, dst = (load_config(p) for p in args.transfer)
        steps = args.steps or src.agent.total_steps
        res = [bench_transfer(src, dst, out, b, steps, args.seeds[0]) for b in args.budgets]
        atomic_write_json(out / f"transfer_{src.task.name}_{dst.task.name}.json", res)
        print(json.dumps(res, indent=1))
        return 0
    cfg = load_config(args.config)
    steps = args.steps or cfg.agent.total_steps
    res = bench_task(cfg, out, args.budgets, args.seeds, steps, args.methods)
    tag = "_".join(f"{b:g}" for b in args.budgets)
    atomic_write_json(out / f"search_{cfg.task.name}_b{tag}.json", res)
    print(_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
