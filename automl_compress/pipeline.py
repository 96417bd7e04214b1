"""The library behind every command: a prepared task, its plans and their scores.

``prepare`` loads the task (with its validation split), builds (or reuses) its layer database and
its calibrated objective; ``check_budget`` says whether a method can reach a budget; ``allocate``
runs a non-RL allocator; ``evaluate_plan`` and ``validate_plan`` score a corrected plan on the
test and validation splits. What spends validation evaluations (the choice of objective and
corrections, the true-metric searches, ``compress``) is in automl_compress/selection.py. Inputs
are arguments (budgets as floats), results are returned; printing and run directories belong to
automl_compress/commands/. The RL side (automl_compress/agents/run.py) and the export check
(automl_compress/roundtrip.py) build on it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from automl_compress.config import AUTO, Config, EvalConfig
from automl_compress.database.allocate import (
    allocate_dp,
    allocate_uniform,
    min_feasible_avg_bits,
    uniform_candidates,
)
from automl_compress.database.build import build_database
from automl_compress.database.store import LayerDatabase
from automl_compress.database.tables import LayerTable
from automl_compress.errors import ConfigError, InfeasibleBudgetError
from automl_compress.evaluate import DenseStats, correct, dense_stats, metric
from automl_compress.objectives import (
    Objective,
    ObjectiveName,
    ObjectiveSpec,
    compute_objective,
    weigh,
)
from automl_compress.plan import CompressionPlan
from automl_compress.stitch import plan_source, stitch
from automl_compress.zoo.base import ItemMetric, Task, fidelity_metric, with_validation

ALLOCATORS = ("uniform", "dp", "rtn")
SEARCHES = ("evo", "spdy")
METHODS = ALLOCATORS + SEARCHES
# the methods that allocate across layers on the objective: alloc.objective=auto is chosen for them
CALIBRATED = ("dp", *SEARCHES)


@dataclass
class Prepared:
    """A task with its layer database and objective, ready for allocation and evaluation.

    Attributes:
        cfg: the resolved config (``cfg.eval`` holds the statistics corrections in force; with
            ``eval.corrections`` auto or calibration a run replaces them,
            :func:`automl_compress.selection.calibrate`).
        task: model, calibration data, validation and test metrics.
        db: the layer database.
        raw_tables: the layer tables in forward order, raw errors.
        raw_rtn_tables: the same layers' round-to-nearest tables (dense pattern only).
        db_dir: where the database lives.
        objective: the calibrated objective (``cfg.alloc.objective``; with ``auto`` the one a
            run chose).
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
    _calib_fidelity: ItemMetric | None = field(default=None, repr=False)
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

    def calib_fidelity(self) -> ItemMetric:
        """The fidelity to the dense outputs on the calibration batches (dense outputs once)."""
        if self._calib_fidelity is None:
            t = self.task
            self._calib_fidelity = fidelity_metric(t.model, t.forward, t.distance, list(t.calib),
                                                   t.name)
        return self._calib_fidelity

    def tables_for(self, plan: CompressionPlan) -> list[LayerTable]:
        """The tables a plan's errors are read from (rtn tables for the rtn baseline)."""
        return self.rtn_tables if plan_source(plan) == "rtn" else self.tables


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when available, else 'cpu'.

    Raises:
        ConfigError: 'cuda' where this torch sees no CUDA device.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        build = "built without CUDA" if torch.version.cuda is None else "sees no GPU"
        raise ConfigError(f"device is 'cuda', but this torch {torch.__version__} {build}; use "
                          "device=auto or device=cpu, or run where torch.cuda.is_available()")
    return device


def _rtn_tables(db: LayerDatabase) -> list[LayerTable]:
    out = []
    for info in db.order:
        sol = db.layer(info.name)
        errs = np.asarray(sol.rtn_errors, dtype=np.float64)[:, None, :]
        out.append(LayerTable(info, sol.table.bits, ("dense",), errs))
    return out


def objective_spec(cfg: Config, name: str | None = None) -> ObjectiveSpec:
    """The objective a config asks for.

    ``name`` overrides ``cfg.alloc.objective``; with ``auto``, the first of
    ``alloc.auto_objectives`` until a run chooses (:func:`automl_compress.selection.calibrate`).
    """
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


def check_budget(prepared: Prepared, budget_bits: float, method: str = "dp") -> None:
    """Raise unless the method can reach the budget.

    Each command path checks it here once, before spending anything (the allocators keep their own
    guards for direct calls).

    Args:
        prepared: the task and its layer tables.
        budget_bits: average bits per compressible weight (metadata included).
        method: 'uniform' and 'rtn' need one option everywhere ('rtn': dense); any other
            method ('dp', the searches, RL) needs some plan.

    Raises:
        InfeasibleBudgetError: the budget is below the smallest one the method can reach.
    """
    cost = prepared.cfg.cost
    if method not in ("uniform", "rtn"):
        minimum = min_feasible_avg_bits(prepared.tables, cost)
        if budget_bits < minimum - 1e-12:
            raise InfeasibleBudgetError(budget_bits, minimum)
        return
    tables = prepared.rtn_tables if method == "rtn" else prepared.tables
    avg = [c[2] for c in uniform_candidates(tables, cost)]
    if avg and budget_bits < min(avg) - 1e-12:  # none: allocate_uniform names the menu
        raise InfeasibleBudgetError(budget_bits, min(avg),
                                    detail="uniform: one bit-width everywhere")


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
    """The plan applied to a copy of the model, with the statistics corrections in force.

    ``eval_cfg`` overrides ``prepared.cfg.eval``.
    """
    model = stitch(prepared.task.model, prepared.db, plan)
    return correct(prepared.task.model, model, prepared.task, plan,
                   eval_cfg or prepared.cfg.eval, prepared.dense_stats())


def evaluate_plan(prepared: Prepared, plan: CompressionPlan) -> float:
    """Test-split metric of the stitched, corrected model (higher is better).

    Only reported: never select on it.
    """
    return metric(stitched_model(prepared, plan), prepared.task)


def validate_plan(prepared: Prepared, plan: CompressionPlan, fraction: float = 1.0,
                  eval_cfg: EvalConfig | None = None) -> float:
    """Validation-split metric of the stitched, corrected model.

    On the first ``fraction`` of the split: what every search selects on.
    """
    validate = prepared.task.validate
    assert validate is not None
    model = stitched_model(prepared, plan, eval_cfg)
    return float(validate(model, fraction) if isinstance(validate, ItemMetric)
                 else validate(model))


def calibration_fidelity(prepared: Prepared, plan: CompressionPlan,
                         eval_cfg: EvalConfig | None = None) -> float:
    """Mean fidelity of the stitched, corrected model's outputs to the dense model's.

    On the calibration batches, under ``task.distance`` (−KL, cosine or −relative squared
    error; higher is better): needs no labels and spends no validation evaluation, so it can
    choose the statistics corrections where nothing may be scored (``eval.corrections =
    calibration``). ``eval_cfg`` overrides ``prepared.cfg.eval``.
    """
    return float(prepared.calib_fidelity()(stitched_model(prepared, plan, eval_cfg)))


def plan_report(prepared: Prepared, plan: CompressionPlan) -> dict[str, float] | None:
    """The task's secondary test-split metrics of the stitched, corrected model.

    None if the task has none.
    """
    if prepared.task.report is None:
        return None
    return {k: float(v) for k, v in prepared.task.report(stitched_model(prepared, plan)).items()}


def resolved_config(prepared: Prepared) -> Config:
    """The config a run directory records: the corrections it chose, fixed.

    So ``evaluate RUN`` re-scores the same model.
    """
    cfg = prepared.cfg
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, corrections="fixed"))

