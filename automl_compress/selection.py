"""What spends validation evaluations: the choice of objective and corrections, the searches.

Every true-metric selection of a run goes through here and is counted in full validation passes
(docs/objectives.md §5–§7):

- :func:`evaluator`: the counting, caching validation scorer every search spends;
- :func:`calibrate`: the objective (``alloc.objective = auto``) and the statistics corrections
  (``eval.corrections = auto``) chosen together on a run's starting plan;
- :func:`search`: evo or spdy from the calibrated DP plan;
- :func:`compress`: an allocator or a search after :func:`calibrate`, with what the choice spent.

The RL side (automl_compress/agents/run.py) calls :func:`calibrate` and :func:`evaluator` too.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

from automl_compress import pipeline
from automl_compress.config import AUTO, BN_MODES, EvalConfig
from automl_compress.database.allocate import allocate_dp
from automl_compress.errors import ConfigError, ObjectiveError
from automl_compress.evaluate import bn_layers
from automl_compress.objectives import Objective
from automl_compress.pipeline import ALLOCATORS, CALIBRATED, METHODS, SEARCHES, Prepared
from automl_compress.plan import CompressionPlan
from automl_compress.search import Evaluator, SearchResult, evo_search, spdy_search
from automl_compress.zoo.base import ItemMetric


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
    score = pipeline.validate_plan
    if prefix:
        return Evaluator(lambda p, f: score(prepared, p, f), validate.items, budget, many)
    return Evaluator(lambda p, f: score(prepared, p, 1.0), lambda f: 1, budget, many)


def correction_choices(prepared: Prepared) -> list[EvalConfig]:
    """The statistics corrections worth comparing for this model.

    The configured one first, then bias correction on/off × every BN mode (BN modes only when the
    model has BatchNorm, bias correction only when a compressed layer has a bias).
    """
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
    """The candidate objectives that can be computed for this model, and why not the others.

    E.g. ``fisher`` cannot be computed for a forward that disables gradients: a warning, not an
    error, while one candidate is left.
    """
    out: dict[str, Objective] = {}
    skipped: dict[str, str] = {}
    last: ObjectiveError | None = None
    for name in names:
        if name is None:
            continue
        try:
            out[name] = pipeline.load_objective(prepared, name, progress=False)
        except ObjectiveError as exc:
            last, skipped[name] = exc, str(exc)
            warnings.warn(f"alloc.objective=auto: candidate {name!r} skipped: {exc}",
                          stacklevel=3)
    if last is not None and not out:
        raise last
    return out, skipped


def _most_faithful(prepared: Prepared, plan: CompressionPlan, choices: list[EvalConfig],
                   fids: dict[tuple[tuple, EvalConfig], float]) -> EvalConfig:
    """The corrections of highest calibration fidelity for ``plan`` (the first on ties).

    Every (plan, corrections) pair is measured once: ``fids`` keeps the measurements.
    """
    key = plan.key()
    for c in choices:
        if (key, c) not in fids:
            fids[(key, c)] = pipeline.calibration_fidelity(prepared, plan, c)
    return max(choices, key=lambda c: fids[(key, c)])


def calibrate(prepared: Prepared, method: str, budget_bits: float) -> dict[str, Any]:
    """Choose the objective and the statistics corrections together.

    The objective when ``alloc.objective = auto`` (on the validation split), the corrections when
    ``eval.corrections`` is ``auto`` (on the validation split) or ``calibration`` (by the
    outputs' fidelity to the dense model on the calibration batches,
    :func:`~automl_compress.pipeline.calibration_fidelity`: no validation evaluations).

    Every candidate objective (``alloc.auto_objectives``; only for the methods in
    :data:`CALIBRATED`, the others keep the loaded one) gives its plan at ``budget_bits`` (the
    DP plan for the searches, the start they warm from), and every correction choice
    (:func:`correction_choices`) scores it (with ``calibration``, only the choice of highest
    fidelity goes on to validation, and only when objectives are compared); the best pair
    becomes ``prepared``'s objective and ``prepared.cfg.eval`` (and, with ``auto``,
    ``prepared.cfg.alloc.objective``: a run directory records what was chosen). Ties keep the
    earlier candidate and the configured corrections; a pair whose plan and corrections were
    scored already costs nothing.

    Returns:
        ``{"objective": {"name", "chosen_on", "scores"}, "corrections": {"bias_correction",
        "bn_reestimate", "chosen_on", "scores", "evaluations"}, "evaluations"}`` with the
        evaluations (full validation passes) the choice spent; 0 when there is nothing to
        choose. With ``calibration`` the corrections' ``scores`` are the fidelities and
        ``calibration_passes`` counts the calibration passes that measured them.
    """
    cfg = prepared.cfg
    auto = cfg.alloc.objective == AUTO and method in CALIBRATED
    names = list(dict.fromkeys(cfg.alloc.auto_objectives)) if auto else [None]
    choices = correction_choices(prepared) if cfg.eval.corrections != "fixed" else [cfg.eval]
    on_calib = cfg.eval.corrections == "calibration" and len(choices) > 1
    objectives, skipped = _candidates(prepared, names)
    names = [n for n in names if n is None or n in objectives]
    scores: dict[tuple[str | None, EvalConfig], float] = {}  # on validation
    seen: dict[tuple[tuple, EvalConfig], float] = {}
    fids: dict[tuple[tuple, EvalConfig], float] = {}  # on calibration
    by_fid: dict[str | None, EvalConfig] = {}
    plan_of: dict[str | None, tuple] = {}
    for name in names if len(names) * len(choices) > 1 else ():
        if name is not None:
            prepared.set_objective(objectives[name])
        plan = pipeline.allocate(prepared, method if method in ALLOCATORS else "dp", budget_bits)
        if on_calib:
            plan_of[name] = plan.key()
            by_fid[name] = _most_faithful(prepared, plan, choices, fids)
            if len(names) == 1:  # one objective: nothing is left to compare on validation
                continue
        for c in [by_fid[name]] if on_calib else choices:
            if (plan.key(), c) not in seen:
                seen[(plan.key(), c)] = pipeline.validate_plan(prepared, plan, 1.0, c)
            scores[(name, c)] = seen[(plan.key(), c)]
    # the first maximum: the earlier objective and the configured corrections on ties
    if scores:
        best_name, best_eval = max(scores, key=lambda k: scores[k])
    elif by_fid:
        best_name, best_eval = next(iter(by_fid.items()))
    else:
        best_name, best_eval = names[0], choices[0]
    if best_name is not None:
        prepared.set_objective(objectives[best_name])
    alloc = dataclasses.replace(cfg.alloc, objective=best_name) if auto else cfg.alloc
    prepared.cfg = dataclasses.replace(cfg, eval=best_eval, alloc=alloc)
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
                   "evaluations": len(seen),
                   "chosen_on": ("calibration" if on_calib else chosen_on) if len(choices) > 1
                   else "config"}
    if on_calib:
        corrections["scores"] = {_label(c): fids[(plan_of[best_name], c)] for c in choices}
        corrections["calibration_passes"] = len(fids)
    elif len(choices) > 1:
        corrections["scores"] = {_label(c): v for (m, c), v in scores.items() if m == best_name}
    return {"objective": objective, "corrections": corrections, "evaluations": len(seen)}


def search(prepared: Prepared, method: str, budget_bits: float,
           evaluations: float | None = None) -> SearchResult:
    """A true-metric search ('evo' or 'spdy') from the calibrated DP plan.

    On the validation split, spending at most ``evaluations`` full validation passes (default
    ``alloc.evaluations``).
    """
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


def compress(prepared: Prepared, method: str, budget_bits: float,
             evaluations: float | None = None) -> tuple[CompressionPlan, dict[str, Any]]:
    """A plan from an allocator or a search, and what selecting it spent on the validation split.

    Allocators ('uniform', 'dp', 'rtn') spend only the choice of the objective (dp, with
    ``alloc.objective = auto``) and the statistics corrections on their plan (:func:`calibrate`);
    searches ('evo', 'spdy') make that choice on the calibrated DP plan, then search with what is
    left of ``evaluations``. The choices become ``prepared``'s objective and ``prepared.cfg.eval``.

    Args:
        prepared: the task, its tables and objective.
        method: one of :data:`METHODS`.
        budget_bits: average bits per compressible weight; checked once
            (:func:`~automl_compress.pipeline.check_budget`).
        evaluations: 'evo'/'spdy': the full validation passes to spend, the choice of objective
            and corrections included (default ``alloc.evaluations``).

    Returns:
        The plan and its ``selection`` (``evaluations``, ``metric_calls``, ``forward_samples``,
        ``corrections``, ``objective_choice``; a search adds ``metric_val``, ``start_val``,
        ``history``).

    Raises:
        ConfigError: an unknown method, or ``evaluations`` that leave nothing to search.
        InfeasibleBudgetError: the budget is below what the method can reach.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, found {method!r}")
    pipeline.check_budget(prepared, budget_bits, method)
    calib = calibrate(prepared, method, budget_bits)
    chosen = calib["evaluations"]
    spent = {"corrections": calib["corrections"], "objective_choice": calib["objective"]}
    if method in ALLOCATORS:
        plan = pipeline.allocate(prepared, method, budget_bits)
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
    sel = {"metric_val": res.metric_val, "start_val": res.start_val,
           "evaluations": spend["evaluations"] + chosen,
           "metric_calls": spend["metric_calls"] + chosen,
           "forward_samples": spend["forward_samples"], **spent, "history": res.history}
    if res.coefficients is not None:
        sel["coefficients"] = list(res.coefficients)
    return res.plan, sel
