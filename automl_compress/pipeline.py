"""The library functions behind ``build-db``, ``compress``, ``evaluate`` and ``export``.

``prepare`` loads the task (with its validation split), builds (or reuses) its layer database and
its calibrated objective; ``allocate`` runs a non-RL allocator and ``search`` a true-metric search;
``evaluate_plan`` scores a plan on the test split and ``validate_plan`` on the validation split,
both after statistics corrections; ``write_run`` writes a run directory (``config.yaml``,
``plan.json``, ``results.json``; keys in docs/architecture.md). The RL side calls the same
functions.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from automl_compress.config import AUTO, BN_MODES, Config, EvalConfig, dump_config, load_config
from automl_compress.database.allocate import (
    allocate_dp,
    allocate_uniform,
    plan_avg_bits,
    plan_bits,
    plan_error,
)
from automl_compress.database.build import build_database
from automl_compress.database.costs import kept_per_row
from automl_compress.database.store import LayerDatabase
from automl_compress.database.tables import LayerTable
from automl_compress.errors import ConfigError, CorruptCacheError, ObjectiveError
from automl_compress.evaluate import DenseStats, bn_layers, correct, dense_stats, metric
from automl_compress.io import atomic_write_json, atomic_write_text
from automl_compress.objectives import (
    Objective,
    ObjectiveName,
    ObjectiveSpec,
    compute_objective,
    describe,
    weigh,
)
from automl_compress.plan import CompressionPlan
from automl_compress.search import Evaluator, SearchResult, evo_search, spdy_search
from automl_compress.stitch import plan_source, stitch
from automl_compress.zoo.base import ItemMetric, Task, with_validation

ALLOCATORS = ("uniform", "dp", "rtn")
SEARCHES = ("evo", "spdy")
METHODS = ALLOCATORS + SEARCHES
# the methods that allocate across layers on the objective: alloc.objective=auto is chosen for them
CALIBRATED = ("dp", *SEARCHES)
RESULT_KEYS = (
    "method", "metric_name", "metric_dense", "metric", "metric_val", "metric_dense_val",
    "budget_bits", "avg_bits", "size_bytes", "compression_ratio", "objective", "objective_choice",
    "proxy_error",
    "evaluations", "metric_calls", "forward_samples", "corrections", "wall_seconds", "layers",
)


@dataclass
class Prepared:
    """A task with its layer database and objective, ready for allocation and evaluation.

    Attributes:
        cfg: the resolved config (``cfg.eval`` holds the statistics corrections in force; with
            ``eval.corrections = auto`` a run replaces them by :func:`choose_corrections`).
        task: model, calibration data, validation and test metrics.
        db: the layer database.
        raw_tables: the layer tables in forward order, raw errors.
        raw_rtn_tables: the same layers' round-to-nearest tables (dense pattern only).
        db_dir: where the database lives.
        objective: the calibrated objective (``cfg.alloc.objective``).
        executor: where plans are scored (automl_compress/executors.py); None or a local one:
            in this process, one by one.
    """

    cfg: Config
    task: Task
    db: LayerDatabase
    raw_tables: list[LayerTable]
    raw_rtn_tables: list[LayerTable]
    db_dir: Path
    objective: Objective | None = None
    executor: Any = field(default=None, repr=False)
    _dense_metric: float | None = field(default=None, repr=False)
    _dense_val: float | None = field(default=None, repr=False)
    _dense_stats: DenseStats | None = field(default=None, repr=False)
    _weighted: tuple[list[LayerTable], list[LayerTable]] | None = field(default=None, repr=False)

    @property
    def tables(self) -> list[LayerTable]:
        """The layer tables weighted by the objective: what every allocator minimises."""
        return self._weights()[0]

    @property
    def rtn_tables(self) -> list[LayerTable]:
        """The round-to-nearest tables weighted by the objective."""
        return self._weights()[1]

    def _weights(self) -> tuple[list[LayerTable], list[LayerTable]]:
        if self._weighted is None:
            if self.objective is None:
                self._weighted = (self.raw_tables, self.raw_rtn_tables)
            else:
                self._weighted = (weigh(self.raw_tables, self.objective),
                                  weigh(self.raw_rtn_tables, self.objective))
        return self._weighted

    def set_objective(self, objective: Objective) -> None:
        """Use another objective's weights from now on."""
        self.objective, self._weighted = objective, None

    def dense_metric(self) -> float:
        """The dense model's test metric (computed once)."""
        if self._dense_metric is None:
            self._dense_metric = metric(self.task.model, self.task)
        return self._dense_metric

    def dense_val(self) -> float:
        """The dense model's validation metric (computed once)."""
        if self._dense_val is None:
            assert self.task.validate is not None
            self._dense_val = float(self.task.validate(self.task.model))
        return self._dense_val

    def dense_stats(self) -> DenseStats:
        """The dense model's calibration statistics for the corrections (measured once)."""
        if self._dense_stats is None:
            self._dense_stats = dense_stats(self.task.model, self.task)
        return self._dense_stats

    def tables_for(self, plan: CompressionPlan) -> list[LayerTable]:
        """The tables a plan's errors are read from (rtn tables for the rtn baseline)."""
        return self.rtn_tables if plan_source(plan) == "rtn" else self.tables


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when available, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _rtn_tables(db: LayerDatabase) -> list[LayerTable]:
    out = []
    for info in db.order:
        sol = db.layer(info.name)
        errs = np.asarray(sol.rtn_errors, dtype=np.float64)[:, None, :]
        out.append(LayerTable(info, sol.table.bits, ("dense",), errs))
    return out


def objective_spec(cfg: Config, name: str | None = None) -> ObjectiveSpec:
    """The objective a config asks for (``name`` overrides ``cfg.alloc.objective``; with
    ``auto``, the first of ``alloc.auto_objectives`` until :func:`choose_objective` runs)."""
    a = cfg.alloc
    corrections = ("bias" if cfg.eval.bias_correction else "", cfg.eval.bn_reestimate)
    name = name or (a.auto_objectives[0] if a.objective == AUTO else a.objective)
    return ObjectiveSpec(ObjectiveName(name), a.fisher_probes, a.loss_batches,
                         cfg.capture.centered, cfg.seed, corrections)


def load_objective(prepared: Prepared, name: str | None = None,
                   progress: bool = True) -> Objective:
    """The named objective (default: the configured one), cached in the database folder."""
    return compute_objective(
        objective_spec(prepared.cfg, name), prepared.task, prepared.raw_tables,
        prepared.db_dir, prepared.db.fingerprints,
        corrected=lambda p: stitched_model(prepared, p), progress=progress)


def prepare(
    cfg: Config, out_dir: str | Path, db_dir: str | Path | None = None, progress: bool = True,
    executor: Any = None,
) -> Prepared:
    """Load the task, build or reuse its layer database, compute or reuse its objective.

    Args:
        cfg: the resolved config.
        out_dir: the run directory; the database goes to ``out_dir/db`` unless ``db_dir``.
        db_dir: a shared database folder (e.g. a cache reused across runs of the same setup).
        progress: show the build progress bar.
        executor: where the layer solves and the plan evaluations run
            (:func:`~automl_compress.executors.open_executor`); None: this process.

    Raises:
        DatabaseMismatchError: the database folder holds another setup's database.
        ObjectiveError: the configured objective cannot be computed for this model.
    """
    from automl_compress.zoo import load_task

    torch.manual_seed(cfg.seed)
    task = with_validation(load_task(cfg.task))
    root = Path(db_dir) if db_dir is not None else Path(out_dir) / "db"
    db = build_database(task, cfg, root, device=resolve_device(cfg.device), progress=progress,
                        executor=executor)
    tables = db.tables()
    prepared = Prepared(cfg, task, db, tables, _rtn_tables(db), root, executor=executor)
    prepared.set_objective(load_objective(prepared, progress=progress))
    return prepared


def allocate(prepared: Prepared, method: str, budget_bits: float) -> CompressionPlan:
    """A plan from one of the non-RL allocators: 'uniform', 'dp' or 'rtn'.

    Raises:
        InfeasibleBudgetError: the budget is below what the method can reach.
    """
    cost = prepared.cfg.cost
    if method == "dp":
        return allocate_dp(prepared.tables, budget_bits, cost)
    if method == "uniform":
        return allocate_uniform(prepared.tables, budget_bits, cost)
    if method == "rtn":
        p = allocate_uniform(prepared.rtn_tables, budget_bits, cost, patterns=("dense",))
        return CompressionPlan(p.layers, meta={**dict(p.meta), "method": "rtn"})
    raise ConfigError(f"method must be one of {METHODS}, found {method!r}")


def stitched_model(prepared: Prepared, plan: CompressionPlan,
                   eval_cfg: EvalConfig | None = None) -> nn.Module:
    """The plan applied to a copy of the model, with the statistics corrections in force
    (``eval_cfg`` overrides ``prepared.cfg.eval``)."""
    model = stitch(prepared.task.model, prepared.db, plan)
    return correct(prepared.task.model, model, prepared.task, plan,
                   eval_cfg or prepared.cfg.eval, prepared.dense_stats())


def evaluate_plan(prepared: Prepared, plan: CompressionPlan) -> float:
    """Test-split metric of the stitched, corrected model (higher is better). Only reported:
    never select on it."""
    return metric(stitched_model(prepared, plan), prepared.task)


def validate_plan(prepared: Prepared, plan: CompressionPlan, fraction: float = 1.0,
                  eval_cfg: EvalConfig | None = None) -> float:
    """Validation-split metric of the stitched, corrected model on the first ``fraction`` of
    the split: what every search selects on."""
    validate = prepared.task.validate
    assert validate is not None
    model = stitched_model(prepared, plan, eval_cfg)
    return float(validate(model, fraction) if isinstance(validate, ItemMetric)
                 else validate(model))


def evaluator(prepared: Prepared, budget: float | None = None) -> Evaluator:
    """A counting, caching validation scorer for this task (``budget`` in full passes).

    A validation metric that is not an :class:`~automl_compress.zoo.base.ItemMetric` cannot
    score a prefix of its split: every score is then a full pass. With a distributed
    ``prepared.executor`` (Ray), batches of plans (:meth:`Evaluator.many`) are scored by its pool
    of actors, under the corrections in force when the batch is scored.
    """
    validate = prepared.task.validate
    prefix = isinstance(validate, ItemMetric)
    if prefix and validate.sizes is None:
        prepared.dense_val()  # learns the split's size
    many = None
    scorer = prepared.executor.scorer(prepared) if prepared.executor is not None else None
    if scorer is not None:
        def many(plans, f):
            return scorer([(p, f if prefix else 1.0, prepared.cfg.eval) for p in plans])
    if prefix:
        return Evaluator(lambda p, f: validate_plan(prepared, p, f), validate.items, budget, many)
    return Evaluator(lambda p, f: validate_plan(prepared, p, 1.0), lambda f: 1, budget, many)


def correction_choices(prepared: Prepared) -> list[EvalConfig]:
    """The statistics corrections worth comparing for this model: the configured one first, then
    bias correction on/off × every BN mode (BN modes only when the model has BatchNorm, bias
    correction only when a compressed layer has a bias)."""
    base = prepared.cfg.eval
    has_bn = bool(bn_layers(prepared.task.model))
    has_bias = any(t.info.has_bias for t in prepared.raw_tables)
    out = [base]
    for bias in ((True, False) if has_bias else (base.bias_correction,)):
        for bn in (BN_MODES if has_bn else (base.bn_reestimate,)):
            c = dataclasses.replace(base, bias_correction=bias, bn_reestimate=bn)
            if c not in out:
                out.append(c)
    return out


def _label(c: EvalConfig) -> str:
    return f"{'bias' if c.bias_correction else 'nobias'}+{c.bn_reestimate}"


def _candidates(prepared: Prepared, names: Sequence[str | None],
                ) -> tuple[dict[str, Objective], dict[str, str]]:
    """The candidate objectives that can be computed for this model, and why the others cannot
    (e.g. ``fisher`` for a forward that disables gradients: a warning, not an error, while one
    candidate is left)."""
    out: dict[str, Objective] = {}
    skipped: dict[str, str] = {}
    last: ObjectiveError | None = None
    for name in names:
        if name is None:
            continue
        try:
            out[name] = load_objective(prepared, name, progress=False)
        except ObjectiveError as exc:
            last, skipped[name] = exc, str(exc)
            warnings.warn(f"alloc.objective=auto: candidate {name!r} skipped: {exc}",
                          stacklevel=3)
    if last is not None and not out:
        raise last
    return out, skipped


def calibrate(prepared: Prepared, method: str, budget_bits: float) -> dict[str, Any]:
    """Choose the objective (``alloc.objective = auto``) and the statistics corrections
    (``eval.corrections = auto``) together, on the validation split.

    Every candidate objective (``alloc.auto_objectives``; only for the methods in
    :data:`CALIBRATED`, the others keep the loaded one) gives its plan at ``budget_bits`` (the
    DP plan for the searches, the start they warm from), and every correction choice
    (:func:`correction_choices`) scores it; the best pair becomes ``prepared``'s objective and
    ``prepared.cfg.eval``. Ties keep the earlier candidate and the configured corrections; a pair
    whose plan and corrections were scored already costs nothing.

    Returns:
        ``{"objective": {"name", "chosen_on", "scores"}, "corrections": {"bias_correction",
        "bn_reestimate", "chosen_on", "scores", "evaluations"}, "evaluations"}`` with the
        evaluations (full validation passes) the choice spent; 0 when there is nothing to
        choose.
    """
    cfg = prepared.cfg
    auto = cfg.alloc.objective == AUTO and method in CALIBRATED
    names = list(dict.fromkeys(cfg.alloc.auto_objectives)) if auto else [None]
    choices = correction_choices(prepared) if cfg.eval.corrections != "fixed" else [cfg.eval]
    objectives, skipped = _candidates(prepared, names)
    names = [n for n in names if n is None or n in objectives]
    scores: dict[tuple[str | None, EvalConfig], float] = {}
    seen: dict[tuple[tuple, EvalConfig], float] = {}
    for name in names if len(names) * len(choices) > 1 else ():
        if name is not None:
            prepared.set_objective(objectives[name])
        plan = allocate(prepared, method if method in ALLOCATORS else "dp", budget_bits)
        for c in choices:
            if (plan.key(), c) not in seen:
                seen[(plan.key(), c)] = validate_plan(prepared, plan, 1.0, c)
            scores[(name, c)] = seen[(plan.key(), c)]
    # the first maximum: the earlier objective and the configured corrections on ties
    best_name, best_eval = (max(scores, key=lambda k: scores[k]) if scores
                            else (names[0], choices[0]))
    if best_name is not None:
        prepared.set_objective(objectives[best_name])
    prepared.cfg = dataclasses.replace(cfg, eval=best_eval)
    chosen_on = "validation" if scores else "config"
    objective = {"name": str(prepared.objective.name) if prepared.objective else "raw",
                 "chosen_on": chosen_on if auto else "config"}
    if auto:
        objective["scores"] = {n: max(v for (m, _), v in scores.items() if m == n)
                               for n in names} if scores else {}
        if skipped:
            objective["skipped"] = skipped
    corrections = {"bias_correction": best_eval.bias_correction,
                   "bn_reestimate": best_eval.bn_reestimate,
                   "evaluations": len(seen), "chosen_on": chosen_on if len(choices) > 1
                   else "config"}
    if len(choices) > 1:
        corrections["scores"] = {_label(c): v for (m, c), v in scores.items() if m == best_name}
    return {"objective": objective, "corrections": corrections, "evaluations": len(seen)}


def choose_corrections(prepared: Prepared, plan: CompressionPlan) -> dict[str, Any]:
    """With ``eval.corrections = auto``: the corrections that score ``plan`` best on the
    validation split (ties keep the configured ones) become ``prepared.cfg.eval``.

    Returns:
        ``{"bias_correction", "bn_reestimate", "evaluations", "chosen_on", "scores"}``; with
        ``eval.corrections = fixed`` the configured values and 0 evaluations.
    """
    cur = prepared.cfg.eval
    if cur.corrections == "fixed":
        return {"bias_correction": cur.bias_correction, "bn_reestimate": cur.bn_reestimate,
                "evaluations": 0, "chosen_on": "config"}
    choices = correction_choices(prepared)
    scores = [validate_plan(prepared, plan, 1.0, c) for c in choices]
    best = choices[int(np.argmax(scores))]  # first maximum: the configured one on ties
    prepared.cfg = dataclasses.replace(prepared.cfg, eval=best)
    return {"bias_correction": best.bias_correction, "bn_reestimate": best.bn_reestimate,
            "evaluations": len(choices) if len(choices) > 1 else 0, "chosen_on": "validation",
            "scores": {_label(c): v for c, v in zip(choices, scores, strict=True)}}


def search(prepared: Prepared, method: str, budget_bits: float,
           evaluations: float | None = None) -> SearchResult:
    """A true-metric search ('evo' or 'spdy') from the calibrated DP plan, on the validation
    split, spending at most ``evaluations`` full validation passes (default
    ``alloc.evaluations``)."""
    a = prepared.cfg.alloc
    ev = evaluator(prepared, float(evaluations if evaluations is not None else a.evaluations))
    cost = prepared.cfg.cost
    if method == "evo":
        start = allocate_dp(prepared.tables, budget_bits, cost)
        return evo_search(prepared.tables, budget_bits, start, ev, cost, a.offspring, a.stages,
                          prepared.cfg.seed)
    if method == "spdy":
        return spdy_search(prepared.tables, budget_bits, ev, cost, a.spdy_inits,
                           prepared.cfg.seed, batch=a.spdy_batch)
    raise ConfigError(f"search must be one of {SEARCHES}, found {method!r}")


def plan_report(prepared: Prepared, plan: CompressionPlan) -> dict[str, float] | None:
    """The task's secondary test-split metrics of the stitched, corrected model (None if the
    task has none)."""
    if prepared.task.report is None:
        return None
    return {k: float(v) for k, v in prepared.task.report(stitched_model(prepared, plan)).items()}


def _layer_rows(prepared: Prepared, plan: CompressionPlan) -> list[dict[str, Any]]:
    out = []
    for t in prepared.tables_for(plan):
        lp = plan.layers[t.info.name]
        hist: dict[str, int] = {}
        for b in lp.row_bits:
            hist[str(b)] = hist.get(str(b), 0) + 1
        kept = sum(kept_per_row(t.info.cols, lp.pattern) for b in lp.row_bits if b > 0)
        out.append({
            "name": t.info.name,
            "rows": t.info.rows,
            "cols": t.info.cols,
            "bits_histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
            "sparsity": 1.0 - kept / max(t.info.numel, 1),
            "error": t.error_of(lp.pattern, np.asarray(lp.row_bits)),
        })
    return out


def results_dict(
    prepared: Prepared, plan: CompressionPlan, method: str, metric_value: float,
    wall_seconds: float, selection: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The results.json content (keys in docs/architecture.md).

    ``selection`` carries what choosing the plan spent on the validation split: ``metric_val``,
    ``evaluations`` (full validation passes), ``metric_calls``, ``forward_samples`` and
    ``corrections``; ``metric_val`` is measured here when absent.
    """
    cfg = prepared.cfg
    sel = dict(selection or {})
    tables = prepared.tables_for(plan)
    n_params = sum(p.numel() for p in prepared.task.model.parameters())
    compressible = sum(t.info.numel for t in tables)
    bits = plan_bits(plan, tables, cfg.cost) + 32.0 * (n_params - compressible)
    size_bytes = bits / 8.0
    metric_val = sel.get("metric_val")
    if metric_val is None:
        metric_val = validate_plan(prepared, plan)
    return {
        "method": method,
        "metric_name": prepared.task.metric_name,
        "metric_dense": prepared.dense_metric(),
        "metric": float(metric_value),
        "metric_val": float(metric_val),
        "metric_dense_val": prepared.dense_val(),
        "budget_bits": float(plan.meta.get("budget_bits", cfg.env.budget_bits)),
        "avg_bits": plan_avg_bits(plan, tables, cfg.cost),
        "size_bytes": size_bytes,
        "compression_ratio": 4.0 * n_params / size_bytes if size_bytes > 0 else float("inf"),
        "objective": str(prepared.objective.name) if prepared.objective else "raw",
        "objective_choice": sel.get("objective_choice", {"name": cfg.alloc.objective,
                                                         "chosen_on": "config"}),
        "proxy_error": plan_error(plan, tables),
        "evaluations": float(sel.get("evaluations", 0.0)),
        "metric_calls": int(sel.get("metric_calls", 0)),
        "forward_samples": int(sel.get("forward_samples", 0)),
        "corrections": sel.get("corrections", {
            "bias_correction": cfg.eval.bias_correction, "bn_reestimate": cfg.eval.bn_reestimate,
            "chosen_on": "config"}),
        "wall_seconds": float(wall_seconds),
        "layers": _layer_rows(prepared, plan),
    }


def write_run(
    out_dir: str | Path,
    cfg: Config,
    prepared: Prepared,
    plan: CompressionPlan,
    method: str,
    metric: float,
    wall_seconds: float,
    extra: Mapping[str, Any] | None = None,
    selection: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write config.yaml, plan.json and results.json atomically; return the results.

    ``selection``: see :func:`results_dict`. ``extra`` entries are appended after the stable keys
    (never replacing them).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    plan.save(out / "plan.json")
    res = results_dict(prepared, plan, method, metric, wall_seconds, selection)
    report = plan_report(prepared, plan)
    if report is not None:
        res["metrics"] = report
    for k, v in (extra or {}).items():
        res.setdefault(k, v)
    atomic_write_json(out / "results.json", res)
    return res


def summary_line(res: Mapping[str, Any]) -> str:
    """One line of a run's results: test and validation metric, size, what selection spent."""
    return (
        f"{res['method']}: {res['metric_name']} {res['metric']:.4f} test / "
        f"{res['metric_val']:.4f} val (dense {res['metric_dense']:.4f} / "
        f"{res['metric_dense_val']:.4f}), avg_bits {res['avg_bits']:.3f} (budget "
        f"{res['budget_bits']:g}), {res['compression_ratio']:.2f}x smaller, {res['objective']} "
        f"proxy {res['proxy_error']:.4g}, {res['evaluations']:g} evaluations, "
        f"{res['wall_seconds']:.1f} s"
    )


def _print_summary(res: Mapping[str, Any], out: Path) -> None:
    print(f"{summary_line(res)} -> {out}")


# ---------------------------------------------------------------------------------------------
# CLI entry points (each returns an exit code)


def run_build_db(cfg: Config, out: Path) -> int:
    """``automl-compress build-db`` (on ``cfg.executor``)."""
    from automl_compress.executors import open_executor

    t0 = time.perf_counter()
    with open_executor(cfg.executor) as ex:
        prepared = prepare(cfg, out, executor=ex)
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out) / "config.yaml", dump_config(cfg))
    n = sum(t.info.numel for t in prepared.tables)
    print(
        f"layer database: {len(prepared.tables)} layers, {n} compressible weights, menu bits "
        f"{list(cfg.menu.bits)} x patterns {list(cfg.menu.patterns)}, "
        f"{time.perf_counter() - t0:.1f} s -> {prepared.db_dir}"
    )
    return 0


def compress(prepared: Prepared, method: str, budget_bits: float,
             evaluations: float | None = None) -> tuple[CompressionPlan, dict[str, Any]]:
    """A plan from an allocator or a search, and what selecting it spent on the validation
    split (the ``selection`` of :func:`results_dict`).

    Allocators ('uniform', 'dp', 'rtn') spend only the choice of the objective and the statistics
    corrections (:func:`calibrate`) on their plan; searches ('evo', 'spdy') make that choice on the
    calibrated DP plan, then search with what is left of ``evaluations`` (default
    ``alloc.evaluations``).
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, found {method!r}")
    calib = calibrate(prepared, method, budget_bits)
    chosen = calib["evaluations"]
    spent = {"corrections": calib["corrections"], "objective_choice": calib["objective"]}
    if method in ALLOCATORS:
        plan = allocate(prepared, method, budget_bits)
        return plan, {"evaluations": chosen, "metric_calls": chosen, "forward_samples": 0,
                      **spent}
    total = float(evaluations if evaluations is not None else prepared.cfg.alloc.evaluations)
    left = total - chosen
    if left < 1:
        raise ConfigError(f"--evaluations {total:g} leaves nothing to search after choosing the "
                          f"objective and the statistics corrections ({chosen} evaluations); "
                          f"give at least {chosen + 1}")
    res = search(prepared, method, budget_bits, left)
    spend = res.spend.as_dict()
    return res.plan, {"metric_val": res.metric_val, "start_val": res.start_val,
                      "evaluations": spend["evaluations"] + chosen,
                      "metric_calls": spend["metric_calls"] + chosen,
                      "forward_samples": spend["forward_samples"], **spent,
                      "history": res.history}


def resolved_config(prepared: Prepared) -> Config:
    """The config a run directory records: the corrections it chose, fixed, so that
    ``evaluate RUN`` re-scores the same model."""
    cfg = prepared.cfg
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, corrections="fixed"))


def run_compress(cfg: Config, method: str, out: Path, evaluations: float | None = None) -> int:
    """``automl-compress compress``: allocate or search (on ``cfg.executor``), evaluate, write
    the run directory."""
    from automl_compress.executors import open_executor

    t0 = time.perf_counter()
    with open_executor(cfg.executor) as ex:
        prepared = prepare(cfg, out, executor=ex)
        print(describe(prepared.objective) if prepared.objective else "objective raw")
        plan, selection = compress(prepared, method, cfg.env.budget_bits, evaluations)
    value = evaluate_plan(prepared, plan)
    extra = {k: selection[k] for k in ("start_val", "history") if k in selection}
    res = write_run(out, resolved_config(prepared), prepared, plan, method, value,
                    time.perf_counter() - t0, extra=extra, selection=selection)
    _print_summary(res, Path(out))
    return 0


def _load_run(run_dir: Path, device: str | None = None) -> tuple[Config, CompressionPlan]:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "plan.json").is_file():
        raise CorruptCacheError(
            f"{str(run_dir)!r} is not a run directory: expected config.yaml and plan.json "
            "written by `automl-compress compress` or `train`"
        )
    cfg = load_config(run_dir / "config.yaml")
    if device is not None:
        cfg = dataclasses.replace(cfg, device=device)
    return cfg, CompressionPlan.load(run_dir / "plan.json")


def run_evaluate(run_dir: Path, device: str | None = None) -> int:
    """``automl-compress evaluate RUN``: re-score the run's plan; update results.json."""
    t0 = time.perf_counter()
    cfg, plan = _load_run(run_dir, device)
    prepared = prepare(cfg, run_dir)
    value = evaluate_plan(prepared, plan)
    path = Path(run_dir) / "results.json"
    if path.is_file():
        res = json.loads(path.read_text())
        res["metric"] = value
        res["metric_dense"] = prepared.dense_metric()
        res["metric_val"] = validate_plan(prepared, plan)
        res["metric_dense_val"] = prepared.dense_val()
        report = plan_report(prepared, plan)
        if report is not None:
            res["metrics"] = report
        atomic_write_json(path, res)
    else:
        method = str(plan.meta.get("method", "unknown"))
        res = write_run(run_dir, cfg, prepared, plan, method, value, time.perf_counter() - t0)
    _print_summary(res, Path(run_dir))
    return 0


EXPORT_FORMATS = ("packed", "state_dict")


def run_export(run_dir: Path, fmt: str = "packed", out: Path | None = None) -> int:
    """``automl-compress export RUN [--format F] [--out PATH]``: write the compressed model and
    check that it reloads with the stitched model's outputs.

    ``packed`` writes ``RUN/compressed.safetensors`` (packed integers, docs/export.md) and prints
    its size beside results.json's ``size_bytes``; ``state_dict`` writes ``RUN/state_dict.pt``, the
    dequantised float state dict of the user's own module classes.
    """
    import copy

    from automl_compress.attention import fuse_attention
    from automl_compress.export import export_compressed, export_state_dict, load_compressed

    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"export format must be one of {EXPORT_FORMATS}, found {fmt!r}")
    cfg, plan = _load_run(run_dir)
    prepared = prepare(cfg, run_dir)
    model = stitched_model(prepared, plan)
    if fmt == "state_dict":
        path = Path(out) if out is not None else Path(run_dir) / "state_dict.pt"
        n_bytes = export_state_dict(path, model)
        reloaded = copy.deepcopy(fuse_attention(prepared.task.model))
        reloaded.load_state_dict(torch.load(path, weights_only=True))
        reloaded.eval()
        summary = f"exported {path} ({n_bytes} bytes, float state dict of the model's own classes)"
    else:
        path = Path(out) if out is not None else Path(run_dir) / "compressed.safetensors"
        sizes = export_compressed(path, model, prepared.db, plan, cost=cfg.cost)
        reloaded = load_compressed(path, prepared.task)
        summary = (
            f"exported {path} ({sizes['file_bytes']} bytes = header {sizes['header_bytes']} + "
            f"payload {sizes['payload_bytes']}; packed weights {sizes['packed_weight_bytes']})"
        )
        res_path = Path(run_dir) / "results.json"
        if res_path.is_file():
            counted = float(json.loads(res_path.read_text())["size_bytes"])
            summary += (f"; results.json size_bytes {counted:.0f}, payload / size_bytes "
                        f"{sizes['payload_bytes'] / counted:.3f}")
    batch = prepared.task.calib[0]
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the same attention kernels on both sides
    try:
        with torch.no_grad():
            a = prepared.task.forward(model, batch)
            b = prepared.task.forward(reloaded, batch)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    same = _same_outputs(a, b)
    print(f"{summary}; reloaded outputs identical: {same}")
    if not same:
        print("automl-compress: error: the reloaded model's outputs differ", file=sys.stderr)
        return 1
    return 0


def _same_outputs(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6))
    if isinstance(a, Mapping):
        return all(_same_outputs(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return all(_same_outputs(x, y) for x, y in zip(a, b, strict=True))
    return a == b
