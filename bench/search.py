"""Search benchmark at equal true-metric evaluations: RL forms vs evo, spdy and calibrated dp.

Every method chooses its statistics corrections on the validation split, selects on the
validation split only, spends at most E validation passes (full-pass equivalents, corrections
included), and is reported on the test split. Every method runs over the same seeds (mean ± std).
dp too: with ``alloc.objective = auto`` the fisher candidate's probes are drawn from the run's
seed, so the calibrated DP plan (the start of every search with that seed) can differ by seed.

Methods (``--methods``):

- ``dp``: the calibrated DP (the warm start of everything else);
- ``evo``, ``spdy``: the true-metric searches (docs/objectives.md);
- ``rl-coef``: the default ``train``: the hierarchy on the coefficient action (both controllers
  learned), moves from the incumbent (``env.coef_anchor=best``);
- ``rl-coef-dp``: the default until 2026-12-06: coefficients relative to the DP plan
  (``env.coef_anchor=dp``, ``agent.neutral_prior=2`` on both controllers,
  ``agent.metric_fraction=0.5``, ``agent.ent_coef=0.01``);
- ``rl-coef-knapsack``: coefficient action, learned layer controller, neutral channel multipliers;
- ``rl-budget``, ``rl-budget-knapsack``: the budget action (layer budget levels + per-group
  widths / the exact knapsack);
- ``haq``: the HAQ-style DDPG baseline.

Usage (databases under OUT/db_<task>, results resumed from OUT/search_<task>.json)::

    python bench/search.py --config configs/digits.yaml --budgets 1.5 --evaluations 64 256
    PYTHONPATH=tests python bench/search.py --config configs/user_model.yaml --budgets 3
    python bench/search.py --config configs/minilm.yaml --budgets 3 --evaluations 64 \\
        --methods dp evo spdy rl-coef

``--range LOW HIGH`` instead trains one budget-conditioned policy per seed with E evaluations and
compares its zero-shot plans at every budget of the grid (as they are, and checked against the
DP plan on validation, ``apply --check-dp``) with dedicated runs there, and with two plain
searches that spend the same E in all: spdy with E evaluations at the range's middle budget, its
coefficients re-planned at every budget of the grid without a new evaluation (``spdy-reused``),
and spdy at every budget of the grid with E / (grid size) evaluations each (``spdy-split``).
``--eval-step S`` compares at the budgets of a finer grid (step S) than the one the policy trains
on (``env.budget_step``): the budgets between are ones the policy never saw, marked † in the
table (its rollout starts there from the incumbent of the nearest lower budget, as ``apply``'s
does); every other row runs there too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from automl_compress import pipeline, selection
from automl_compress.agents.callbacks import Progress
from automl_compress.agents.hierarchical import Search
from automl_compress.agents.run import by_budget, checked_rollout
from automl_compress.agents.tracking import MetricOracle
from automl_compress.config import Config, load_config
from automl_compress.database.allocate import plan_avg_bits
from automl_compress.io import atomic_write_json
from automl_compress.search.spdy import coefficient_plan

LEARNED = {
    "rl-coef": {"form": "hierarchical", "action": "coefficient"},
    "rl-coef-dp": {"form": "hierarchical", "action": "coefficient", "neutral_prior": 2.0,
                   "layer_moves": None, "ent_coef": 0.01,
                   "metric_fraction": 0.5, "env": {"coef_anchor": "dp"}},
    "rl-coef-knapsack": {"form": "hierarchical", "action": "coefficient",
                         "channel_controller": "knapsack"},
    "rl-budget": {"form": "hierarchical", "action": "budget"},
    "rl-budget-knapsack": {"form": "hierarchical", "action": "budget",
                           "channel_controller": "knapsack"},
    "haq": {"form": "haq"},
}
SEARCHES = ("evo", "spdy")
#: A learned run stops when its evaluations are spent or after this many env steps per evaluation
#: of its budget: a policy that only repeats plans already scored spends nothing (a repeated plan
#: is free), so without a step cap such a run would never stop. Every run in docs/benchmarks.md
#: stopped on its evaluations below this cap (at most 16,210 env steps at E = 64) except the three
#: marked there.
STEPS_PER_EVALUATION = 400


def _with(cfg: Config, budget: float, seed: int, env: dict | None = None, **agent: Any) -> Config:
    """``cfg`` at this budget and seed with env and agent overrides.

    A method's own ``env`` entry (``LEARNED``) is merged under ``env``.
    """
    env = {**agent.pop("env", {}), **(env or {})}
    return dataclasses.replace(
        cfg, seed=seed, env=dataclasses.replace(cfg.env, budget_bits=float(budget), **env),
        agent=dataclasses.replace(cfg.agent, **agent))


def _row(prepared: pipeline.Prepared, plan, sel: dict[str, Any], t0: float,
         extra: dict[str, Any] | None = None) -> dict[str, Any]:
    test = pipeline.evaluate_plan(prepared, plan)
    val = sel.get("metric_val")
    if val is None:
        val = pipeline.validate_plan(prepared, plan)
    return {"metric": test, "metric_val": float(val), "evaluations": float(sel["evaluations"]),
            "avg_bits": plan_avg_bits(plan, prepared.tables_for(plan), prepared.cfg.cost),
            "wall_seconds": time.perf_counter() - t0, "plan": plan.to_dict(), **(extra or {})}


def learned(prepared: pipeline.Prepared, cfg: Config, evaluations: float,
            models: dict | None = None) -> tuple[dict[str, Any], Search]:
    """Train one learned form within ``evaluations`` and return its row and the search."""
    t0 = time.perf_counter()
    prepared.cfg = cfg
    corr = selection.calibrate(prepared, "dp", cfg.env.budget_bits)
    ev = selection.evaluator(prepared, evaluations - corr["evaluations"])
    cap = int(STEPS_PER_EVALUATION * evaluations)
    search = Search(prepared.tables, prepared.cfg, metric_dense=prepared.dense_val(),
                    progress=Progress(cap), evaluator=ev, models=models)
    search.train(cap)
    best = search.finalize()
    sel = {"metric_val": best.metric, "evaluations": ev.spent + corr["evaluations"]}
    moves = {n: search.expected_moves(n) for n in search.coefficient_controllers()}
    return _row(prepared, best.plan, sel, t0, {"env_steps": search.progress.steps,
                                               "episodes": search.tracker.episodes,
                                               "expected_moves": moves,
                                               "evaluations_by_budget": by_budget(search)}), search


def non_learned(prepared: pipeline.Prepared, cfg: Config, method: str,
                evaluations: float | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    prepared.cfg = cfg
    plan, sel = selection.compress(prepared, method, cfg.env.budget_bits, evaluations)
    return _row(prepared, plan, sel, t0)


def _agg(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in ("metric", "metric_val", "evaluations", "wall_seconds"):
        vals = [float(r[k]) for r in rows]
        out[k] = statistics.fmean(vals)
        out[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    out["n"] = len(rows)
    return out


def bench_task(cfg: Config, out: Path, budgets: list[float], evaluations: list[int],
               seeds: list[int], methods: list[str]) -> dict[str, Any]:
    path = out / f"search_{cfg.task.name}.json"
    result = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    prepared = pipeline.prepare(cfg, out, db_dir=out / f"db_{cfg.task.name}", progress=False)
    base = prepared.cfg
    result.update({"task": cfg.task.name, "metric_name": prepared.task.metric_name,
                   "dense": prepared.dense_metric(), "dense_val": prepared.dense_val(),
                   "objective": cfg.alloc.objective})
    for b in budgets:
        for m in methods:
            for e in ([None] if m == "dp" else evaluations):
                for s in seeds:
                    label = f"{b:g}/{m}/{e}/{s}"
                    if label in result["runs"]:
                        continue
                    c = _with(base, b, s, **LEARNED.get(m, {}))
                    if m in LEARNED:
                        row, search = learned(prepared, c, float(e))
                        search.close()
                    else:
                        row = non_learned(prepared, c, m, e)
                    result["runs"][label] = row
                    atomic_write_json(path, result)
                    print(f"{cfg.task.name} b={b:g} {m} E={e} seed={s}: test {row['metric']:.4f}"
                          f" val {row['metric_val']:.4f} ({row['evaluations']:.0f} evaluations,"
                          f" {row['wall_seconds']:.0f} s)", flush=True)
    prepared.cfg = base
    return result


def train_range(prepared: pipeline.Prepared, lo: float, hi: float, seed: int, method: str,
                evaluations: int) -> tuple[dict[str, Any], Search, Config]:
    """Train seed ``seed``'s budget-conditioned policy over [lo, hi] (the grid of
    ``env.budget_step``, its plan at the range's middle); its row, its search and the config
    carrying the objective and corrections it chose (as `apply` reads them from the manifest).
    """
    base = prepared.cfg
    c = _with(base, base.env.range_middle(lo, hi), seed, {"budget_range": (lo, hi)},
              **LEARNED[method])
    row, search = learned(prepared, c, float(evaluations))
    return row, search, prepared.cfg


@contextlib.contextmanager
def lent_start(search: Search, budget: float, trained: Sequence[float]) -> Iterator[float | None]:
    """The search's rollouts at ``budget`` start as `apply`'s would: between the training
    budgets from the nearest lower incumbent (``Anchors.lend``); the loan ends on exit.

    Yields the budget lent from, or None.
    """
    lent = search.anchors.lend(budget, trained)
    try:
        yield lent
    finally:
        if lent is not None:
            del search.anchors.best[round(float(budget), 6)]


def bench_range(cfg: Config, out: Path, lo: float, hi: float, evaluations: int,
                seeds: list[int], method: str, eval_step: float | None = None) -> dict[str, Any]:
    """One budget-conditioned policy per seed vs dedicated runs at every budget compared.

    The policy trains on the grid of ``env.budget_step``; the comparison runs on the grid of
    ``eval_step`` (default: the same) joined with it.
    """
    path = out / f"range_{cfg.task.name}_{method}.json"
    result = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    # files written before dp ran per seed hold it as dp/<budget>: that is seed 0's
    result["runs"] = {(k + "/0" if k.startswith("dp/") and k.count("/") == 1 else k): v
                      for k, v in result["runs"].items()}
    prepared = pipeline.prepare(cfg, out, db_dir=out / f"db_{cfg.task.name}", progress=False)
    base = prepared.cfg
    mid = base.env.range_middle(lo, hi)
    trained = _with(base, mid, 0, {"budget_range": (lo, hi)}).env.budgets()
    step = base.env.budget_step if eval_step is None else eval_step
    grid = tuple(sorted(set(trained) | set(
        _with(base, mid, 0, {"budget_range": (lo, hi), "budget_step": step}).env.budgets())))
    for s in seeds:
        label = f"range/{s}"
        have = result["runs"].get(label, {})
        if "corrections" not in have or set(have["zero_shot"]) != {f"{b:g}" for b in grid}:
            # (re)train: the same seed gives the same policy; every budget's rollout is scored
            # under the objective and corrections it chose
            row, search, chosen = train_range(prepared, lo, hi, s, method, evaluations)
            # zero-shot rollouts start from this run's incumbents, as `apply` on the same model
            # does (agents/run.py policy_incumbents): from the best plan it found at a budget of
            # the grid, from the DP plan at a budget it never visited
            zero, checked = {}, {}
            for b in grid:
                prepared.cfg = _with(chosen, b, s, {"budget_range": (lo, hi)})
                with lent_start(search, b, trained) as lent:
                    plan = search.rollout(True, b, measure=False).plan
                    zero[f"{b:g}"] = _row(prepared, plan, {"evaluations": 0.0},
                                          time.perf_counter(), {"lent_from": lent})
                    t0 = time.perf_counter()
                    oracle = MetricOracle(selection.evaluator(prepared))
                    plan, val, kept = checked_rollout(search, b, oracle)
                    checked[f"{b:g}"] = _row(prepared, plan, {"metric_val": val,
                                                              "evaluations": oracle.evaluations},
                                             t0, {"kept": kept, "lent_from": lent})
            search.close()
            result["runs"][label] = {"trained": row, "zero_shot": zero, "checked": checked,
                                     "corrections": dataclasses.asdict(chosen.eval),
                                     "objective": chosen.alloc.objective}
            atomic_write_json(path, result)
        if f"spdy-reuse/{s}" not in result["runs"]:
            result["runs"][f"spdy-reuse/{s}"] = spdy_reused(prepared, _with(base, mid, s), grid,
                                                            evaluations)
            atomic_write_json(path, result)
        for b in grid:
            label = f"dedicated/{b:g}/{s}"
            if label not in result["runs"]:
                row, search = learned(prepared, _with(base, b, s, **LEARNED[method]),
                                      float(evaluations))
                search.close()
                result["runs"][label] = row
                atomic_write_json(path, result)
            label = f"spdy-split/{b:g}/{s}"
            if label not in result["runs"]:
                result["runs"][label] = non_learned(prepared, _with(base, b, s), "spdy",
                                                    evaluations // len(grid))
                atomic_write_json(path, result)
            if f"dp/{b:g}/{s}" not in result["runs"]:  # the seed's calibration (fisher probes)
                result["runs"][f"dp/{b:g}/{s}"] = non_learned(prepared, _with(base, b, s), "dp",
                                                              None)
                atomic_write_json(path, result)
    prepared.cfg = base
    result.update({"grid": list(grid), "trained_grid": list(trained), "evaluations": evaluations,
                   "method": method})
    atomic_write_json(path, result)
    return result


def spdy_reused(prepared: pipeline.Prepared, cfg: Config, grid: list[float],
                evaluations: int) -> dict[str, Any]:
    """spdy at ``cfg``'s budget, then its coefficients re-planned at every budget of ``grid``.

    The re-plans spend no evaluation; they are scored under the objective and corrections the
    search chose, as the range policy's zero-shot plans are under its own.
    """
    t0 = time.perf_counter()
    prepared.cfg = cfg
    plan, sel = selection.compress(prepared, "spdy", cfg.env.budget_bits, float(evaluations))
    searched = _row(prepared, plan, sel, t0)
    chosen = prepared.cfg
    reused = {}
    for b in grid:
        t0 = time.perf_counter()
        prepared.cfg = _with(chosen, b, cfg.seed)
        p = coefficient_plan(prepared.tables, b, sel["coefficients"], chosen.cost)
        reused[f"{b:g}"] = _row(prepared, p, {"evaluations": 0.0}, t0)
    return {"searched": searched, "reused": reused, "coefficients": sel["coefficients"],
            "corrections": dataclasses.asdict(chosen.eval)}


RANGE_METHODS = ("zero-shot", "zero-shot-checked", "dedicated", "spdy-split", "spdy-reused", "dp")


def complete_seeds(result: dict[str, Any]) -> list[str]:
    """The seeds of a ``--range`` result that every kind of run holds in full.

    A seed counts for a kind (range, spdy-reuse, dedicated, spdy-split, dp) when it has that
    kind's row at every budget any seed has one at; kinds with no row at all are not asked. So
    every method's means are over the same seeds.
    """
    budgets: dict[str, dict[str, set[str]]] = {}  # kind -> seed -> budgets held
    for label in result["runs"]:
        kind, *budget, seed = label.split("/")
        budgets.setdefault(kind, {}).setdefault(seed, set()).update(budget)
    sets = [{seed for seed, held in by_seed.items() if held == set().union(*by_seed.values())}
            for by_seed in budgets.values()]
    return sorted(set.intersection(*sets), key=int) if sets else []


def range_rows(result: dict[str, Any], seeds: list[str] | None = None,
               ) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """A ``--range`` result's rows by method and budget (one row per seed; only ``seeds``,
    default :func:`complete_seeds`).

    Methods: ``zero-shot`` (one budget-conditioned policy per seed, one rollout per budget),
    ``zero-shot-checked`` (that rollout or the DP plan, the better on validation: 2 evaluations),
    ``spdy-reused`` (one spdy search per seed at the middle budget, re-planned at each budget),
    ``spdy-split`` (spdy at each budget with the evaluations split between the budgets),
    ``dedicated`` (one training run per budget and seed) and ``dp``.
    """
    keep = set(complete_seeds(result) if seeds is None else seeds)
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {m: {} for m in RANGE_METHODS}
    for label, row in result["runs"].items():
        kind, rest = label.split("/", 1)
        if label.split("/")[-1] not in keep:
            continue
        if kind == "range":
            for key, method in (("zero_shot", "zero-shot"), ("checked", "zero-shot-checked")):
                for b, r in row.get(key, {}).items():
                    rows[method].setdefault(b, []).append(r)
        elif kind == "spdy-reuse":
            for b, r in row["reused"].items():
                rows["spdy-reused"].setdefault(b, []).append(r)
        elif kind in ("dedicated", "dp", "spdy-split"):
            rows[kind].setdefault(rest.split("/")[0], []).append(row)
    return rows


def range_curves(result: dict[str, Any], task: str, tb_dir: Path) -> list[str]:
    """The budget-range comparison as TensorBoard metric-vs-bits curves (means over seeds).

    One curve per method of :func:`range_rows`; x = mean avg_bits.
    """
    from torch.utils.tensorboard import SummaryWriter

    from automl_compress.logs import log_curve

    rows = range_rows(result)
    writer = SummaryWriter(str(tb_dir / "range"))
    tags = []
    try:
        for split, key in (("test", "metric"), ("validation", "metric_val")):
            points = {m: [(statistics.fmean(r["avg_bits"] for r in rs),
                           statistics.fmean(r[key] for r in rs)) for rs in by_b.values()]
                      for m, by_b in rows.items() if by_b}
            tags += log_curve(writer, task, points, split)
    finally:
        writer.close()
    return tags


def range_table(result: dict[str, Any]) -> str:
    """Markdown: per budget, each method's test mean ± std over seeds (validation mean), the
    zero-shot plans against the dedicated runs in points, the mean over the grid, and where the
    range runs spent their training evaluations (mean over seeds); every method over the same
    seeds (:func:`complete_seeds`), named in the first line. Budgets the policy did not train
    at (``trained_grid``) are marked †."""
    seeds = complete_seeds(result)
    rows = range_rows(result, seeds)
    methods = [m for m in RANGE_METHODS if rows[m]]
    grid = [f"{b:g}" for b in result["grid"]]
    trained = [f"{b:g}" for b in result.get("trained_grid", result["grid"])]
    gap = "zero-shot" in methods and "dedicated" in methods
    every = sorted({label.split("/")[-1] for label in result["runs"]}, key=int)
    left = [x for x in every if x not in seeds]
    lines = [f"seeds {', '.join(seeds)}" + (f" (left out, incomplete: {', '.join(left)})"
                                           if left else ""), "",
             "| budget | " + " | ".join(f"{m} test (val)" for m in methods)
             + (" | zero-shot − dedicated |" if gap else " |"),
             "|---:|" + "---:|" * (len(methods) + gap)]
    means: dict[str, dict[str, tuple[float, float]]] = {m: {} for m in methods}
    for b in grid:
        cells = []
        for m in methods:
            rs = rows[m].get(b, [])
            if not rs:
                cells.append("–")
                continue
            a = _agg(rs)
            means[m][b] = (a["metric"], a["metric_val"])
            cells.append(f"{a['metric']:.4f} ± {a['metric_std']:.4f} ({a['metric_val']:.4f})")
        if gap and b in means["zero-shot"] and b in means["dedicated"]:
            cells.append(f"{100 * (means['zero-shot'][b][0] - means['dedicated'][b][0]):+.2f} pt")
        elif gap:
            cells.append("–")
        lines.append(f"| {b}{'' if b in trained else ' †'} | " + " | ".join(cells) + " |")
    full = {m: (statistics.fmean(t for t, _ in means[m].values()),
                statistics.fmean(v for _, v in means[m].values()))
            for m in methods if len(means[m]) == len(grid)}
    cells = [f"{full[m][0]:.4f} ({full[m][1]:.4f})" if m in full else "–" for m in methods]
    if gap:
        both = {"zero-shot", "dedicated"} <= set(full)
        cells.append(f"{100 * (full['zero-shot'][0] - full['dedicated'][0]):+.2f} pt"
                     if both else "–")
    lines.append("| mean over the grid | " + " | ".join(cells) + " |")
    if trained != grid:
        lines += ["", "† not a budget the policy trained at: its rollout starts from the "
                  "incumbent of the nearest lower budget that has one (else the DP plan)"]
    spent = [result["runs"][f"range/{x}"]["trained"]["evaluations_by_budget"] for x in seeds
             if "evaluations_by_budget" in result["runs"].get(f"range/{x}", {}).get("trained", {})]
    if spent:
        lines += ["", f"range runs' training evaluations by budget, mean over {len(spent)} "
                  "seeds: " + " / ".join(
                      f"{b}: {statistics.fmean(float(x.get(b, 0.0)) for x in spent):.1f}"
                      for b in trained)]
    return "\n".join(lines)


def table(result: dict[str, Any]) -> str:
    """Markdown: per budget, method and evaluation budget, mean ± std over seeds."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for label, row in result["runs"].items():
        b, m, e, _ = label.split("/")
        groups.setdefault((b, m, e), []).append(row)
    lines = [f"### {result['task']} ({result['metric_name']}; dense {result['dense']:.4f} test "
             f"/ {result['dense_val']:.4f} val; objective {result['objective']})", "",
             "| budget | method | E | test | val | evaluations | wall s | seeds |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for (b, m, e), rows in sorted(groups.items(), key=lambda kv: (-float(kv[0][0]), kv[0][2],
                                                                  kv[0][1])):
        a = _agg(rows)
        lines.append(f"| {b} | {m} | {e} | {a['metric']:.4f} ± {a['metric_std']:.4f} | "
                     f"{a['metric_val']:.4f} ± {a['metric_val_std']:.4f} | "
                     f"{a['evaluations']:.0f} | {a['wall_seconds']:.0f} | {a['n']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/digits.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--budgets", type=float, nargs="+", default=[3.0])
    ap.add_argument("--evaluations", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["dp", *SEARCHES, *LEARNED],
                    choices=["dp", *SEARCHES, *LEARNED])
    ap.add_argument("--range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"))
    ap.add_argument("--eval-step", type=float, default=None, metavar="S",
                    help="with --range: compare on the grid of step S (default env.budget_step)")
    ap.add_argument("--tb", default=None, metavar="DIR",
                    help="with --range: also write the metric-vs-bits curves to DIR/range")
    ap.add_argument("--out", default="bench_out/search")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, args.overrides)
    if args.range:
        res = bench_range(cfg, out, args.range[0], args.range[1], args.evaluations[0],
                          args.seeds, args.methods[0] if args.methods[0] in LEARNED else
                          "rl-coef", args.eval_step)
        print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))
        for label, run in sorted(res["runs"].items()):
            if label.startswith("range/") and "evaluations_by_budget" in run["trained"]:
                print(f"{label}: training evaluations by budget "
                      f"{run['trained']['evaluations_by_budget']}")
        print(range_table(res))
        if args.tb:
            tags = range_curves(res, cfg.task.name, Path(args.tb))
            print(f"{len(tags)} TensorBoard curves -> {Path(args.tb) / 'range'}")
        return 0
    res = bench_task(cfg, out, args.budgets, args.evaluations, args.seeds, args.methods)
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
