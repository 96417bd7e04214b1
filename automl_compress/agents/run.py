"""``automl-compress train`` and ``automl-compress apply``.

``run_train``: prepare the task and its layer database (built or reused under ``RUN/db``), choose
the statistics corrections on the calibrated DP plan, train the controllers
(:class:`~automl_compress.agents.hierarchical.Search`) with episode rewards from the validation
split, evaluate the final candidates there, and write ``plan.json`` / ``results.json`` (method
``rl``: the best plan on the validation split, reported on the test split) / ``policy/`` /
``tb/``. A checkpoint (``policy/`` zips + manifest + ``policy/checkpoint.json``
with the step count and the best plan) is written every ``agent.checkpoint_every`` steps, at the
end of every controller turn and on Ctrl-C; ``--resume`` continues from it.

``run_apply``: load a trained policy (its manifest must fit the configured menu and env spec),
optionally fine-tune it on the configured model, roll it out and write the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from automl_compress import pipeline
from automl_compress.agents.callbacks import Progress
from automl_compress.agents.hierarchical import Search
from automl_compress.agents.transfer import (
    check_manifest,
    controller_names,
    read_manifest,
    save_policy,
)
from automl_compress.config import Config, dump_config
from automl_compress.database.allocate import min_feasible_avg_bits
from automl_compress.errors import ConfigError, InfeasibleBudgetError, PolicyMismatchError
from automl_compress.io import atomic_write_json
from automl_compress.plan import CompressionPlan

CHECKPOINT = "checkpoint.json"


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """While training, SIGTERM (a plain ``kill``) raises KeyboardInterrupt so a checkpoint is
    written; the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_budget(prepared: pipeline.Prepared, cfg: Config) -> None:
    minimum = min_feasible_avg_bits(prepared.tables, cfg.cost)
    if cfg.env.budget_bits < minimum - 1e-12:
        raise InfeasibleBudgetError(cfg.env.budget_bits, minimum)


def load_models(policy_dir: str | Path, names: list[str]) -> dict[str, Any]:
    """Load the SB3 zips of a policy folder (spaces are checked when they meet an env).

    Raises:
        PolicyMismatchError: a zip the manifest names is missing or unreadable.
    """
    from sb3_contrib import MaskablePPO
    from stable_baselines3 import DDPG

    out = {}
    for n in names:
        path = Path(policy_dir) / f"{n}.zip"
        cls = DDPG if n == "haq" else MaskablePPO
        try:
            out[n] = cls.load(str(path), device="cpu")
        except (OSError, ValueError, KeyError) as exc:
            raise PolicyMismatchError(
                f"expected a readable {cls.__name__} model at {str(path)!r}, found an error "
                f"({exc}); re-run `automl-compress train` to write the policy"
            ) from None
    return out


def _final_plan(search: Search, cfg: Config, extra_meta: dict[str, Any],
                zero_shot: bool = False) -> tuple[CompressionPlan, float | None]:
    """The run's plan and its validation metric (None for a zero-shot rollout, which is not
    scored: it spends no evaluations)."""
    if zero_shot:
        s = search.rollout(True, cfg.env.budget_bits, measure=False)
        best_plan, value = s.plan, None
    else:
        best = search.finalize()
        best_plan, value = best.plan, best.metric if math.isfinite(best.metric) else None
    meta = {**dict(best_plan.meta), "method": "rl", "form": cfg.agent.form,
            "action": cfg.agent.action, "layer_controller": cfg.agent.layer_controller,
            "channel_controller": cfg.agent.channel_controller,
            "budget_bits": float(cfg.env.budget_bits), "seed": cfg.seed, **extra_meta}
    return CompressionPlan(best_plan.layers, meta=meta), value


def _selection(search: Search, corrections: dict[str, Any],
               metric_val: float | None) -> dict[str, Any]:
    o = search.oracle
    spent = o.evaluations if o is not None else 0.0
    return {"metric_val": metric_val, "evaluations": spent + corrections["evaluations"],
            "metric_calls": (o.evaluator.calls if o is not None else 0)
            + corrections["evaluations"],
            "forward_samples": o.samples if o is not None else 0, "corrections": corrections}


def _print_against_baselines(prepared: pipeline.Prepared, res: dict[str, Any], out: Path,
                             extra: str) -> None:
    """The run's line, then dp and uniform at the same budget (what the search bought)."""
    print(f"{pipeline.summary_line(res)}, {extra} -> {out}")
    budget = float(res["budget_bits"])
    for method in ("dp", "uniform"):
        try:
            plan = pipeline.allocate(prepared, method, budget)
        except InfeasibleBudgetError:
            print(f"  {method:>7}: infeasible at {budget:g} bits")
            continue
        test = pipeline.evaluate_plan(prepared, plan)
        val = pipeline.validate_plan(prepared, plan)
        print(f"  {method:>7}: {res['metric_name']} {test:.4f} test / {val:.4f} val, avg_bits "
              f"{pipeline.plan_avg_bits(plan, prepared.tables_for(plan), prepared.cfg.cost):.3f}"
              f" (same objective and corrections)")


def _training_budget(evaluations: float | None, corrections: dict[str, Any]) -> float | None:
    if evaluations is None:
        return None
    left = float(evaluations) - corrections["evaluations"]
    if left < 2:
        raise ConfigError(f"--evaluations {evaluations:g} leaves nothing for training after "
                          f"choosing the statistics corrections ({corrections['evaluations']} "
                          "evaluations); give more")
    return left


def run_train(cfg: Config, out: str | Path, total_steps: int | None = None, resume: bool = False,
              progress: bool = True, evaluations: float | None = None) -> int:
    """``automl-compress train``: search with the RL controllers and write the run directory.

    Args:
        cfg: the resolved config (budget ``cfg.env.budget_bits``; ``env.budget_range`` trains
            one policy for the whole range).
        out: the run directory.
        total_steps: env steps at most (default ``cfg.agent.total_steps``).
        resume: continue from ``out/policy/checkpoint.json`` when present.
        progress: show the progress bar.
        evaluations: the validation passes training may spend (corrections choice and final
            candidates included; default ``cfg.alloc.evaluations``, the same budget ``evo`` and
            ``spdy`` get); training stops when they are spent or after ``total_steps``.

    Returns:
        0 on success.

    Raises:
        InfeasibleBudgetError: a budget is below the feasible minimum.
        PolicyMismatchError: ``resume`` with a checkpoint of another menu / env spec.
        ExecutorError: ``executor.kind=ray`` without Ray, or an unreachable cluster.
    """
    from automl_compress.executors import open_executor

    with open_executor(cfg.executor) as ex:
        return _train(cfg, Path(out), total_steps, resume, progress, evaluations, ex)


def _train(cfg: Config, out: Path, total_steps: int | None, resume: bool, progress: bool,
           evaluations: float | None, executor: Any) -> int:
    """:func:`run_train`'s body, on ``executor`` (the database build and the final candidates'
    scores)."""
    t0 = time.perf_counter()
    total = int(total_steps if total_steps is not None else cfg.agent.total_steps)
    if evaluations is None:
        evaluations = cfg.alloc.evaluations
    if total < 1:
        raise ConfigError(f"--total-steps must be >= 1, found {total}")
    prepared = pipeline.prepare(cfg, out, progress=progress, executor=executor)
    _check_budget(prepared, cfg)
    corrections = pipeline.choose_corrections(
        prepared, pipeline.allocate(prepared, "dp", cfg.env.budget_bits))
    cfg = prepared.cfg
    policy_dir, tb_dir = out / "policy", out / "tb"
    state: dict[str, Any] = {}
    models = None
    if resume and (policy_dir / CHECKPOINT).is_file():
        check_manifest(read_manifest(policy_dir), cfg)
        state = json.loads((policy_dir / CHECKPOINT).read_text())
        models = load_models(policy_dir, controller_names(cfg))
        print(f"resuming from step {state['steps']} of {total}")
    elif resume:
        print(f"no checkpoint in {policy_dir}; starting a new search")
    done = int(state.get("steps", 0))
    prog = Progress(total, done, show=progress)
    ev = pipeline.evaluator(prepared, _training_budget(evaluations, corrections))
    ev.calls, ev.samples = int(state.get("metric_calls", 0)), int(state.get("samples", 0))
    search = Search(prepared.tables, cfg, metric_dense=prepared.dense_val(), tb_dir=tb_dir,
                    progress=prog, models=models, purge_step=done or None, evaluator=ev)
    if state.get("tracker"):
        search.tracker.restore(state["tracker"])
    wall0 = float(state.get("wall_seconds", 0.0))
    if search.writer is not None:
        search.writer.config(dump_config(cfg))

    def checkpoint() -> None:
        save_policy(policy_dir, search.models, cfg, prog.steps)
        atomic_write_json(policy_dir / CHECKPOINT, {
            "steps": prog.steps, "total_steps": total, "tracker": search.tracker.state(),
            "metric_calls": ev.calls, "samples": ev.samples,
            "wall_seconds": wall0 + time.perf_counter() - t0})

    try:
        with _terminate_as_interrupt():
            search.train(total, checkpoint)
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
             "budget_range": list(cfg.env.budget_range)}
    res = pipeline.write_run(out, pipeline.resolved_config(prepared), prepared, plan, "rl",
                             pipeline.evaluate_plan(prepared, plan),
                             wall0 + time.perf_counter() - t0, extra=extra,
                             selection=_selection(search, corrections, value_val))
    _print_against_baselines(prepared, res, out, f"{prog.steps} env steps")
    return 0


def _policy_folder(policy: str | Path) -> Path:
    p = Path(policy)
    return p / "policy" if (p / "policy").is_dir() else p


def run_apply(cfg: Config, out: str | Path, policy_dir: str | Path, finetune_steps: int = 0,
              progress: bool = True, evaluations: float | None = None) -> int:
    """``automl-compress apply``: compress the configured model with a trained policy.

    Zero-shot (no fine-tuning): one deterministic rollout at ``cfg.env.budget_bits``, with the
    statistics corrections the policy's training run chose; it spends no validation evaluations
    (its validation metric is reported, not used). Fine-tuned: the corrections are chosen on
    this model's validation split, the controllers train ``finetune_steps`` more steps (or until
    ``evaluations`` are spent) and the plan is chosen like ``train``'s.

    Args:
        cfg: the resolved config of the target model (its menu and env spec must match the
            policy's; the controllers' form is taken from the policy's manifest).
        out: the run directory.
        policy_dir: a train run directory (or its ``policy/`` folder).
        finetune_steps: env steps of fine-tuning on the target model (0 = zero-shot).
        progress: show the progress bar.
        evaluations: fine-tuning's validation budget (corrections and final candidates
            included).

    Raises:
        PolicyMismatchError: the policy's feature spec, menu or env spec does not fit.
        InfeasibleBudgetError: the budget is below the feasible minimum.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if finetune_steps < 0:
        raise ConfigError(f"--finetune-steps must be >= 0, found {finetune_steps}")
    zero_shot = finetune_steps == 0 and evaluations is None
    pdir = _policy_folder(policy_dir)
    manifest = read_manifest(pdir)
    ctrl = manifest.get("controllers", {})
    try:
        cfg = dataclasses.replace(cfg, agent=dataclasses.replace(cfg.agent, **ctrl))
        if zero_shot and manifest.get("eval"):
            cfg = dataclasses.replace(cfg, eval=dataclasses.replace(
                cfg.eval, corrections="fixed", **manifest["eval"]))
    except (TypeError, ConfigError) as exc:
        raise PolicyMismatchError(f"the policy manifest's controllers {ctrl!r} are not valid "
                                  f"here ({exc}); re-train the policy") from None
    check_manifest(manifest, cfg)
    rng = manifest.get("budget_range") or []
    if rng and not rng[0] - 1e-9 <= cfg.env.budget_bits <= rng[1] + 1e-9:
        warnings.warn(f"--budget-bits {cfg.env.budget_bits:g} is outside the range the policy "
                      f"was trained for ({rng[0]:g}-{rng[1]:g}); the plan is an extrapolation",
                      stacklevel=2)
    prepared = pipeline.prepare(cfg, out, progress=progress)
    _check_budget(prepared, cfg)
    corrections = pipeline.choose_corrections(
        prepared, pipeline.allocate(prepared, "dp", cfg.env.budget_bits))
    cfg = dataclasses.replace(cfg, eval=prepared.cfg.eval)
    models = load_models(pdir, controller_names(cfg))
    steps = finetune_steps if finetune_steps > 0 else (cfg.agent.total_steps * 100
                                                       if evaluations is not None else 1)
    prog = Progress(steps, 0, show=progress and not zero_shot)
    ev = pipeline.evaluator(prepared, None if zero_shot else
                            _training_budget(evaluations, corrections))
    try:
        search = Search(prepared.tables, cfg, metric_dense=prepared.dense_val(),
                        tb_dir=out / "tb", progress=prog, models=models, evaluator=ev)
    except ValueError as exc:
        raise PolicyMismatchError(f"the policy's spaces do not fit this model's env: {exc}") \
            from None
    try:
        if search.writer is not None:
            search.writer.config(dump_config(cfg))
        if not zero_shot:
            search.train(steps)
        plan, value_val = _final_plan(search, cfg, {"policy": str(pdir),
                                                    "finetune_steps": finetune_steps},
                                      zero_shot=zero_shot)
        if not zero_shot:
            save_policy(out / "policy", search.models, cfg, prog.steps)
    finally:
        prog.close()
        search.close()
    extra = {"policy": str(pdir), "policy_model_family": manifest.get("model_family"),
             "finetune_steps": int(finetune_steps), "zero_shot": zero_shot,
             "env_steps": prog.steps if not zero_shot else 0,
             "episodes": search.tracker.episodes, "form": cfg.agent.form,
             "action": cfg.agent.action}
    res = pipeline.write_run(out, pipeline.resolved_config(prepared), prepared, plan, "rl",
                             pipeline.evaluate_plan(prepared, plan), time.perf_counter() - t0,
                             extra=extra, selection=_selection(search, corrections, value_val))
    label = "zero-shot" if zero_shot else f"fine-tuned {prog.steps} steps"
    _print_against_baselines(prepared, res, out, label)
    return 0
