"""Env step time on the database path (no true-metric evaluation): the issue's ≤ 1 ms goal.

Times ``step`` (episode resets included, in the total) of every env the controllers train in,
with uniformly random actions (every coefficient episode is then a new plan: the DP runs at every
episode end, the worst case) and with the neutral action (the plan cache answers, the best case):

- coefficient env (the default ``train``): 'layer' mode (the layer controller's env, channel
  multipliers neutral) and 'channel' mode (the channel controller's, layer coefficients neutral);
- budget env: 'layer' mode with the exact knapsack inside each layer, 'channel' mode under the
  DP's layer budgets.

It also times one DP solve over random per-layer coefficients (what every coefficient episode and
every SPDY step pays), ``--dp-solves`` of them.

Usage::

    OMP_NUM_THREADS=1 python bench/env_step.py --config configs/digits.yaml --steps 5000
    PYTHONPATH=tests python bench/env_step.py --config configs/user_model.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from automl_compress import pipeline
from automl_compress.agents.policies import CHANNEL_POLICIES, LAYER_POLICIES
from automl_compress.config import load_config
from automl_compress.database.allocate import allocate_dp, dp_candidates
from automl_compress.envs.coef_env import CoefficientEnv
from automl_compress.envs.compression_env import CompressionEnv
from automl_compress.io import atomic_write_json


def _envs(tables, cfg):
    budgets = cfg.env.budgets()
    return {
        "coefficient/layer": lambda: CoefficientEnv(tables, cfg, mode="layer", budgets=budgets),
        "coefficient/channel": lambda: CoefficientEnv(tables, cfg, mode="channel",
                                                      budgets=budgets),
        "budget/layer": lambda: CompressionEnv(tables, cfg, mode="layer",
                                               channel_policy=CHANNEL_POLICIES["knapsack"]()),
        "budget/channel": lambda: CompressionEnv(tables, cfg, mode="channel",
                                                 layer_policy=LAYER_POLICIES["dp"](tables, cfg)),
    }


def time_env(make, steps: int, policy: str, seed: int = 0) -> dict[str, float]:
    """Mean and percentiles of one step's wall time (ms) over ``steps`` steps, resets included."""
    env = make()
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    times, episodes = [], 0
    t_all = time.perf_counter()
    for _ in range(steps):
        mask = env.action_masks()
        allowed = np.flatnonzero(mask)
        if policy == "random":
            a = int(rng.choice(allowed))
        else:  # the neutral coefficient, or the first allowed budget action
            a = int(getattr(env, "neutral", allowed[0]))
            if not mask[a]:
                a = int(allowed[0])
        t0 = time.perf_counter()
        _, _, done, _, _ = env.step(a)
        if done:
            env.reset()
            episodes += 1
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - t_all
    ms = np.asarray(times) * 1e3
    return {"mean_ms": float(ms.mean()), "median_ms": float(np.median(ms)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()),
            "episodes": episodes, "steps": steps, "wall_s": total}


def time_dp(tables, cfg, solves: int, seed: int = 0) -> dict[str, float]:
    """Wall time (ms) of ``allocate_dp`` at the config's budget, coefficients 10^U(-1, 1)."""
    cands = dp_candidates(tables, cfg.cost)
    rng = np.random.default_rng(seed)
    times = []
    for _ in range(solves):
        w = 10.0 ** rng.uniform(-1, 1, len(tables))
        t0 = time.perf_counter()
        allocate_dp(tables, cfg.env.budget_bits, cfg.cost, layer_weights=w, candidates=cands,
                    memo={})
        times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1e3
    return {"mean_ms": float(ms.mean()), "median_ms": float(np.median(ms)),
            "candidates": sum(len(c) for c in cands), "solves": solves}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--dp-solves", type=int, default=50)
    ap.add_argument("--out", default="bench_out/env_step")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prepared = pipeline.prepare(cfg, out, db_dir=out / f"db_{cfg.task.name}", progress=False)
    tables = prepared.tables
    rows = {}
    print(f"{cfg.task.name}: {len(tables)} layers, {sum(t.info.rows for t in tables)} rows, "
          f"budgets {list(cfg.env.budgets())}, objective {prepared.cfg.alloc.objective}")
    dp = time_dp(tables, prepared.cfg, args.dp_solves)
    rows["dp_solve"] = dp
    print(f"DP solve over {dp['candidates']} candidates: {dp['mean_ms']:.1f} ms mean, "
          f"{dp['median_ms']:.1f} ms median ({args.dp_solves} solves, knapsacks included)")
    print("| env | actions | mean ms | median ms | p99 ms | max ms | episodes |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, make in _envs(tables, prepared.cfg).items():
        for policy in ("random", "neutral"):
            r = time_env(make, args.steps, policy)
            rows[f"{name}/{policy}"] = r
            print(f"| {name} | {policy} | {r['mean_ms']:.3f} | {r['median_ms']:.3f} | "
                  f"{r['p99_ms']:.2f} | {r['max_ms']:.1f} | {r['episodes']} |", flush=True)
    atomic_write_json(out / f"env_step_{cfg.task.name}.json",
                      {"task": cfg.task.name, "steps": args.steps, "rows": rows})
    print(json.dumps({"written": str(out / f"env_step_{cfg.task.name}.json")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
