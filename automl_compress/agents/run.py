"""The library behind ``train`` and ``apply``: train a policy, or apply a trained one.

:func:`start_training` checks the budget, chooses the objective and the statistics corrections on
the calibrated DP plan (:func:`~automl_compress.selection.calibrate`) and reads a checkpoint to
resume from; :meth:`Training.run` trains the controllers
(:class:`~automl_compress.agents.hierarchical.Search`) on validation-split rewards, checkpointing
(``policy/`` zips + manifest + ``checkpoint.json``) every ``agent.checkpoint_every`` steps, after
every controller turn and on KeyboardInterrupt. :func:`open_policy` reads a trained policy for a
target config; :func:`apply_policy` optionally fine-tunes it and rolls it out. Both return a
:class:`PolicyRun` (method ``rl``); the run directory and the printing are the commands'
(automl_compress/commands/). The budget is the prepared config's ``env.budget_bits``, the one the
controllers' envs read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from automl_compress import pipeline, selection
from automl_compress.agents.callbacks import Progress
from automl_compress.agents.hierarchical import Search
from automl_compress.agents.tracking import MetricOracle
from automl_compress.agents.transfer import (
    check_manifest,
    controller_names,
    load_models,
    policy_folder,
    read_manifest,
    save_policy,
)
from automl_compress.config import AUTO, Config, dump_config
from automl_compress.errors import ConfigError, PolicyMismatchError
from automl_compress.io import atomic_write_json
from automl_compress.plan import CompressionPlan

CHECKPOINT = "checkpoint.json"


@dataclass
class PolicyRun:
    """What training or applying a policy produced, ready for the run directory.

    Attributes:
        plan: the run's plan (``meta["method"] == "rl"``).
        selection: what choosing it spent on the validation split (``results_dict``'s).
        extra: the results.json entries after the stable keys.
        steps: env steps taken in all (resumed ones included; 0 for a zero-shot rollout).
        wall_before: seconds a resumed run had spent before this process.
    """

    plan: CompressionPlan
    selection: dict[str, Any]
    extra: dict[str, Any]
    steps: int
    wall_before: float = 0.0


def checked_rollout(search: Search, budget: float, oracle: MetricOracle | None = None) \
        -> tuple[CompressionPlan, float | None, str]:
    """The deterministic rollout at ``budget`` or the DP plan, whichever scores higher.

    Both are scored on the whole validation split by a counting oracle (two evaluations, one
    when they are the same plan); a tie keeps the policy's plan.

    Args:
        search: the trained search (its policy and its DP reference).
        budget: average bits per compressible weight.
        oracle: the scorer (default: the search's own).

    Returns:
        The kept plan, its validation metric, and which it is ('policy' or 'dp').
    """
    oracle = oracle or search.oracle
    assert oracle is not None
    cands = [search.rollout(True, budget, measure=False).plan, search.dp_plan(budget)]
    scores = oracle.measure_many(cands)
    keys = [(m if m is not None else -math.inf) for m in scores]
    k = 0 if keys[0] >= keys[1] else 1
    return cands[k], scores[k], ("policy", "dp")[k]


def _final_plan(search: Search, cfg: Config, extra_meta: dict[str, Any],
                zero_shot: bool = False, check_dp: bool = False) \
        -> tuple[CompressionPlan, float | None]:
    """The run's plan and its validation metric (None for an unscored zero-shot rollout).

    ``check_dp`` (zero-shot only): :func:`checked_rollout`.
    """
    if zero_shot and check_dp:
        best_plan, value, kept = checked_rollout(search, cfg.env.budget_bits)
        extra_meta = {**extra_meta, "checked_against_dp": True, "kept": kept}
    elif zero_shot:
        best_plan = search.rollout(True, cfg.env.budget_bits, measure=False).plan
        value = None
    else:
        best = search.finalize()
        best_plan, value = best.plan, best.metric if math.isfinite(best.metric) else None
    meta = {**dict(best_plan.meta), "method": "rl", "form": cfg.agent.form,
            "action": cfg.agent.action, "layer_controller": cfg.agent.layer_controller,
            "channel_controller": cfg.agent.channel_controller,
            "budget_bits": float(cfg.env.budget_bits), "seed": cfg.seed, **extra_meta}
    return CompressionPlan(best_plan.layers, meta=meta), value


def by_budget(search: Search) -> dict[str, float]:
    """The training's validation passes by the budget of the plans they scored (JSON keys).

    The objective and corrections choice before training is not included.
    """
    if search.oracle is None:
        return {}
    return {f"{b:g}": v for b, v in sorted(search.oracle.by_budget.items())}


def _selection(search: Search, calibration: dict[str, Any],
               metric_val: float | None) -> dict[str, Any]:
    o = search.oracle
    spent = o.evaluations if o is not None else 0.0
    return {"metric_val": metric_val, "evaluations": spent + calibration["evaluations"],
            "metric_calls": (o.evaluator.calls if o is not None else 0)
            + calibration["evaluations"],
            "forward_samples": o.samples if o is not None else 0,
            "corrections": calibration["corrections"],
            "objective_choice": calibration["objective"]}


def _training_budget(evaluations: float | None, calibration: dict[str, Any]) -> float | None:
    if evaluations is None:
        return None
    left = float(evaluations) - calibration["evaluations"]
    if left < 2:
        raise ConfigError(f"--evaluations {evaluations:g} leaves nothing for training after "
                          f"choosing the objective and the statistics corrections "
                          f"({calibration['evaluations']} evaluations); give more")
    return left


def incumbent_key(prepared: pipeline.Prepared) -> str:
    """What a run's incumbents mean: its database, objective and statistics corrections.

    An incumbent is a vector of ladder indices over the objective-weighted tables with a score
    under the corrections, so it is the same plan with the same score only where all three match.
    """
    cfg = prepared.cfg
    blob = json.dumps({"db": prepared.db.fingerprints,
                       "objective": pipeline.objective_spec(cfg).relevant(),
                       "eval": [cfg.eval.bias_correction, cfg.eval.bn_reestimate]},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def policy_incumbents(folder: Path, prepared: pipeline.Prepared) -> dict[str, Any]:
    """The incumbents a policy's training run left, where they mean the same plans here.

    Empty when the run left none (no checkpoint, another anchor) or trained on another database,
    objective or corrections (:func:`incumbent_key`).
    """
    path = folder / CHECKPOINT
    if not path.is_file():
        return {}
    state = json.loads(path.read_text())
    if state.get("incumbent_key") != incumbent_key(prepared):
        return {}
    return dict(state.get("anchors", {}))


def _calibrate_at_budget(prepared: pipeline.Prepared) -> dict[str, Any]:
    """Check the budget once, then choose the objective and the corrections there.

    Both are chosen on the DP plan at that budget (:func:`~automl_compress.selection.calibrate`).
    """
    budget = float(prepared.cfg.env.budget_bits)
    pipeline.check_budget(prepared, budget)
    return selection.calibrate(prepared, "dp", budget)


def training_steps(cfg: Config, total_steps: int | None = None) -> int:
    """The env steps a training run takes at most.

    Args:
        cfg: the run config.
        total_steps: the steps asked for (default ``cfg.agent.total_steps``).

    Returns:
        The step count.

    Raises:
        ConfigError: fewer than one step.
    """
    total = int(total_steps if total_steps is not None else cfg.agent.total_steps)
    if total < 1:
        raise ConfigError(f"--total-steps must be >= 1, found {total}")
    return total


@dataclass
class Training:
    """An RL search ready to :meth:`run`: budget checked, corrections chosen, checkpoint read.

    Attributes:
        prepared: the task, with the chosen corrections in ``prepared.cfg.eval``.
        calibration: :func:`~automl_compress.selection.calibrate`'s record (objective,
            corrections and the evaluations they spent).
        policy_dir: where the policy and its checkpoints are written.
        total_steps: env steps at most, resumed ones included.
        evaluations: validation passes left after the calibration (None: only
            ``total_steps``).
        state: the checkpoint resumed from (empty for a new search).
        models: the checkpoint's SB3 models (None for a new search).
        started: ``time.perf_counter()`` at the run's start (its wall time counts from there).
    """

    prepared: pipeline.Prepared
    calibration: dict[str, Any]
    policy_dir: Path
    total_steps: int
    evaluations: float | None
    state: dict[str, Any] = field(default_factory=dict)
    models: dict[str, Any] | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def resumed_steps(self) -> int | None:
        """The checkpoint's step count, or None when the search starts anew."""
        return int(self.state["steps"]) if self.state else None

    def run(self, tb_dir: str | Path | None, progress: bool = True) -> PolicyRun:
        """Train until ``total_steps`` or the evaluations are spent; return the best plan.

        Args:
            tb_dir: the TensorBoard folder (None: no TensorBoard).
            progress: show the progress bar.

        Returns:
            The run's plan, selection and extra results entries.

        Raises:
            KeyboardInterrupt: re-raised after a checkpoint is written.
        """
        cfg, prepared, state, t0 = self.prepared.cfg, self.prepared, self.state, self.started
        done = int(state.get("steps", 0))
        prog = Progress(self.total_steps, done, show=progress)
        ev = selection.evaluator(prepared, self.evaluations)
        ev.calls, ev.samples = int(state.get("metric_calls", 0)), int(state.get("samples", 0))
        search = Search(prepared.tables, cfg, metric_dense=prepared.dense_val(),
                        tb_dir=None if tb_dir is None else Path(tb_dir), progress=prog,
                        models=self.models, purge_step=done or None, evaluator=ev)
        if state.get("tracker"):
            search.tracker.restore(state["tracker"])
        search.anchors.restore(state.get("anchors", {}))
        if search.oracle is not None:
            search.oracle.by_budget = {float(b): float(v) for b, v in
                                       state.get("evaluations_by_budget", {}).items()}
        wall0 = float(state.get("wall_seconds", 0.0))
        key = incumbent_key(prepared)  # the corrections and objective are chosen by now
        if search.writer is not None:
            search.writer.config(dump_config(cfg))

        def checkpoint() -> None:
            save_policy(self.policy_dir, search.models, cfg, prog.steps)
            atomic_write_json(self.policy_dir / CHECKPOINT, {
                "steps": prog.steps, "total_steps": self.total_steps,
                "tracker": search.tracker.state(), "anchors": search.anchors.state(),
                "incumbent_key": key, "metric_calls": ev.calls,
                "samples": ev.samples, "wall_seconds": wall0 + time.perf_counter() - t0,
                "evaluations_by_budget": by_budget(search)})

        try:
            search.train(self.total_steps, checkpoint)
            plan, value_val = _final_plan(search, cfg, {"env_steps": prog.steps})
            checkpoint()
        except KeyboardInterrupt:
            checkpoint()
            raise
        finally:
            prog.close()
            search.close()
        extra = {"env_steps": prog.steps, "episodes": search.tracker.episodes,
                 "form": cfg.agent.form, "action": cfg.agent.action,
                 "layer_controller": cfg.agent.layer_controller,
                 "channel_controller": cfg.agent.channel_controller,
                 "budget_range": list(cfg.env.budget_range),
                 "evaluations_by_budget": by_budget(search)}
        return PolicyRun(plan, _selection(search, self.calibration, value_val), extra,
                         prog.steps, wall0)


def start_training(prepared: pipeline.Prepared, policy_dir: str | Path, total_steps: int,
                   evaluations: float | None = None, resume: bool = False,
                   started: float | None = None) -> Training:
    """Check the budget, choose the corrections and read the checkpoint of a training run.

    Args:
        prepared: the prepared task (budget ``prepared.cfg.env.budget_bits``;
            ``env.budget_range`` trains one policy for the whole range).
        policy_dir: the run's policy folder (checkpoints are read from and written there).
        total_steps: env steps at most (:func:`training_steps`).
        evaluations: the validation passes training may spend, the choice of objective and
            corrections and the final candidates included (None: ``cfg.alloc.evaluations``, the
            budget ``evo`` and ``spdy`` get).
        resume: continue from ``policy_dir/checkpoint.json`` when present.
        started: ``time.perf_counter()`` at the run's start (default: now).

    Returns:
        The search, ready to :meth:`Training.run`.

    Raises:
        InfeasibleBudgetError: the budget is below the feasible minimum.
        ConfigError: ``evaluations`` leave nothing for training.
        PolicyMismatchError: ``resume`` with a checkpoint of another menu / env spec.
    """
    if evaluations is None:
        evaluations = prepared.cfg.alloc.evaluations
    calibration = _calibrate_at_budget(prepared)
    policy_dir = Path(policy_dir)
    state: dict[str, Any] = {}
    models = None
    if resume and (policy_dir / CHECKPOINT).is_file():
        check_manifest(read_manifest(policy_dir), prepared.cfg)
        state = json.loads((policy_dir / CHECKPOINT).read_text())
        models = load_models(policy_dir, controller_names(prepared.cfg))
    return Training(prepared, calibration, policy_dir, int(total_steps),
                    _training_budget(evaluations, calibration), state, models,
                    time.perf_counter() if started is None else started)


@dataclass(frozen=True)
class PolicySource:
    """A trained policy read for a target model by :func:`open_policy`.

    Attributes:
        folder: the policy folder.
        manifest: its manifest (docs/env.md §6).
        cfg: the target config with the policy's controllers (and, zero-shot, the objective
            its training run chose, and its corrections on its own model or
            ``eval.corrections = calibration`` on another).
        zero_shot: no fine-tuning: one deterministic rollout, no validation evaluations.
        check_dp: zero-shot: the rollout is kept only if it scores at least the DP plan on
            validation (2 evaluations).
    """

    folder: Path
    manifest: dict[str, Any]
    cfg: Config
    zero_shot: bool
    check_dp: bool = False


def open_policy(cfg: Config, policy: str | Path, finetune_steps: int = 0,
                evaluations: float | None = None, check_dp: bool = False) -> PolicySource:
    """Read a trained policy and fit the target config to it.

    Zero-shot (``finetune_steps == 0`` and no ``evaluations``) takes the objective the policy's
    training run chose and, on the policy's own model, its statistics corrections too (its
    incumbents were scored under them). On another model the corrections are chosen there by
    the outputs' fidelity to the dense model on the calibration batches (``eval.corrections =
    calibration``: no labels, no validation evaluation; the policy's values first on ties).
    With ``check_dp`` on another model both are chosen on its validation split instead, as the
    calibrated dp chooses them, so that the check compares the rollout with dp itself. A budget
    outside the policy's trained range warns, and so does a zero-shot rollout on another model
    than the policy's without ``check_dp``.

    Args:
        cfg: the resolved config of the target model (its menu and env spec must match the
            policy's; the controllers' form is taken from the manifest).
        policy: a train run directory (or its ``policy/`` folder).
        finetune_steps: env steps of fine-tuning (0 = zero-shot unless ``evaluations``).
        evaluations: fine-tuning's validation budget.
        check_dp: zero-shot: keep the better of the rollout and the DP plan on validation
            (on another model, under the objective and corrections chosen there).

    Returns:
        The policy and the fitted config.

    Raises:
        ConfigError: negative ``finetune_steps``; ``check_dp`` with fine-tuning.
        PolicyMismatchError: the policy's feature spec, menu or env spec does not fit.
    """
    if finetune_steps < 0:
        raise ConfigError(f"--finetune-steps must be >= 0, found {finetune_steps}")
    zero_shot = finetune_steps == 0 and evaluations is None
    if check_dp and not zero_shot:
        raise ConfigError("--check-dp is for a zero-shot apply; fine-tuning already keeps the "
                          "DP plan among its final candidates (drop --check-dp, or drop "
                          "--finetune-steps / --evaluations)")
    pdir = policy_folder(policy)
    manifest = read_manifest(pdir)
    ctrl = manifest.get("controllers", {})
    family = manifest.get("model_family")
    other_model = family not in (None, cfg.task.name)
    # a zero-shot rollout scores nothing on validation, so it keeps the policy's objective and,
    # on its own model, its corrections (on another, the most faithful on calibration there);
    # checked on another model it is compared with dp as dp runs there: both chosen here
    pinned = zero_shot and not (check_dp and other_model)
    try:
        cfg = dataclasses.replace(cfg, agent=dataclasses.replace(cfg.agent, **ctrl))
        if pinned and (other_model or manifest.get("eval")):
            cfg = dataclasses.replace(cfg, eval=dataclasses.replace(
                cfg.eval, corrections="calibration" if other_model else "fixed",
                **manifest.get("eval") or {}))
        if pinned and (manifest.get("objective") or cfg.alloc.objective == AUTO):
            # the policy's objective (a manifest older than `auto` has none: the first
            # candidate), so that a zero-shot rollout scores nothing
            cfg = dataclasses.replace(cfg, alloc=dataclasses.replace(
                cfg.alloc, objective=manifest.get("objective") or cfg.alloc.auto_objectives[0]))
    except (TypeError, ConfigError) as exc:
        raise PolicyMismatchError(f"the policy manifest's controllers {ctrl!r} are not valid "
                                  f"here ({exc}); re-train the policy") from None
    check_manifest(manifest, cfg)
    rng = manifest.get("budget_range") or []
    if rng and not rng[0] - 1e-9 <= cfg.env.budget_bits <= rng[1] + 1e-9:
        warnings.warn(f"--budget-bits {cfg.env.budget_bits:g} is outside the range the policy "
                      f"was trained for ({rng[0]:g}-{rng[1]:g}); the plan is an extrapolation",
                      stacklevel=2)
    if zero_shot and not check_dp and other_model:
        warnings.warn(f"a zero-shot rollout of a policy trained on {family!r} is applied to "
                      f"{cfg.task.name!r} unchecked: on another model its moves can fall far "
                      "below the DP plan (docs/benchmarks.md §3, Transfer); pass --check-dp to "
                      "keep the better of the two on validation (dp's objective and corrections "
                      "choice, then 2 evaluations)", stacklevel=2)
    return PolicySource(pdir, manifest, cfg, zero_shot, check_dp)


def apply_policy(prepared: pipeline.Prepared, source: PolicySource, finetune_steps: int = 0,
                 evaluations: float | None = None, tb_dir: str | Path | None = None,
                 save_dir: str | Path | None = None, progress: bool = True) -> PolicyRun:
    """Compress the prepared model with a trained policy.

    Zero-shot: one deterministic rollout at the budget with the policy's corrections (on
    another model, the corrections of highest calibration fidelity there); it spends
    no validation evaluations, or two with ``source.check_dp`` (the rollout and the calibrated
    DP plan are scored on the validation split and the better is kept, so the result is never
    below dp there; on another model than the policy's, after choosing the objective and the
    corrections there as dp does, whose evaluations it also spends). Fine-tuned: the corrections
    are chosen on this model's validation split, the controllers train ``finetune_steps`` more
    steps (or until ``evaluations`` are spent) and the plan is chosen like training's (the DP plan
    is always among its final candidates).

    Args:
        prepared: the target task, prepared with ``source.cfg``.
        source: the policy (:func:`open_policy`).
        finetune_steps: env steps of fine-tuning.
        evaluations: fine-tuning's validation budget (corrections and final candidates
            included).
        tb_dir: the TensorBoard folder (None: none).
        save_dir: where a fine-tuned policy is saved (None: not saved).
        progress: show the progress bar (never for a zero-shot rollout).

    Returns:
        The run's plan, selection and extra results entries.

    Raises:
        InfeasibleBudgetError: the budget is below the feasible minimum.
        PolicyMismatchError: the policy's spaces do not fit this model's env.
    """
    zero_shot = source.zero_shot
    calibration = _calibrate_at_budget(prepared)
    cfg = dataclasses.replace(source.cfg, eval=prepared.cfg.eval)
    models = load_models(source.folder, controller_names(cfg))
    steps = finetune_steps if finetune_steps > 0 else (cfg.agent.total_steps * 100
                                                       if evaluations is not None else 1)
    prog = Progress(steps, 0, show=progress and not zero_shot)
    ev = selection.evaluator(prepared, None if zero_shot else
                            _training_budget(evaluations, calibration))
    try:
        search = Search(prepared.tables, cfg, metric_dense=prepared.dense_val(),
                        tb_dir=None if tb_dir is None else Path(tb_dir), progress=prog,
                        models=models, evaluator=ev)
    except ValueError as exc:
        raise PolicyMismatchError(f"the policy's spaces do not fit this model's env: {exc}") \
            from None
    # zero-shot on the model the policy was trained on: its rollouts move from the plans that
    # run found (the incumbents at its budgets), not from the DP plan
    incumbents = policy_incumbents(source.folder, prepared) if zero_shot else {}
    search.anchors.restore(incumbents)
    # a budget it never trained at starts from the incumbent of the nearest budget below
    # (a manifest older than the `budgets` entry lends nothing)
    lent = search.anchors.lend(cfg.env.budget_bits, source.manifest.get("budgets") or
                               [cfg.env.budget_bits])
    incumbent_start = search.anchors.get(cfg.env.budget_bits) is not None
    try:
        if search.writer is not None:
            search.writer.config(dump_config(cfg))
        if not zero_shot:
            search.train(steps)
        plan, value_val = _final_plan(search, cfg, {"policy": str(source.folder),
                                                    "finetune_steps": finetune_steps},
                                      zero_shot=zero_shot, check_dp=source.check_dp)
        if not zero_shot and save_dir is not None:
            save_policy(Path(save_dir), search.models, cfg, prog.steps)
    finally:
        prog.close()
        search.close()
    extra = {"policy": str(source.folder),
             "policy_model_family": source.manifest.get("model_family"),
             "finetune_steps": int(finetune_steps), "zero_shot": zero_shot,
             "checked_against_dp": bool(zero_shot and source.check_dp),
             "incumbent_start": incumbent_start, "incumbent_lent_from": lent,
             "env_steps": prog.steps if not zero_shot else 0,
             "episodes": search.tracker.episodes, "form": cfg.agent.form,
             "action": cfg.agent.action}
    return PolicyRun(plan, _selection(search, calibration, value_val), extra,
                     prog.steps if not zero_shot else 0)
