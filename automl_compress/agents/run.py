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


def _best_plan(search: Search, cfg: Config, extra_meta: dict[str, Any]) -> tuple[
        CompressionPlan, float]:
    best = search.tracker.best
    assert best is not None, "the search finished no episode"
    meta = {**dict(best.plan.meta), "method": "rl", "form": cfg.agent.form,
            "layer_controller": cfg.agent.layer_controller,
            "channel_controller": cfg.agent.channel_controller,
            "budget_bits": float(cfg.env.budget_bits), "seed": cfg.seed, **extra_meta}
    return CompressionPlan(best.plan.layers, meta=meta), best.metric


def _print(res: dict[str, Any], out: Path, extra: str) -> None:
    print(
        f"rl: {res['metric_name']} {res['metric']:.4f} (dense {res['metric_dense']:.4f}), "
        f"avg_bits {res['avg_bits']:.3f} (budget {res['budget_bits']:g}), "
        f"{res['compression_ratio']:.2f}x smaller, proxy error {res['proxy_error']:.4g}, "
        f"{extra}, {res['wall_seconds']:.1f} s -> {out}"
    )


def run_train(cfg: Config, out: str | Path, total_steps: int | None = None, resume: bool = False,
              progress: bool = True) -> int:
    """``automl-compress train``: search with the RL controllers and write the run directory.

    Args:
        cfg: the resolved config (budget ``cfg.env.budget_bits``).
        out: the run directory.
        total_steps: env steps (default ``cfg.agent.total_steps``).
        resume: continue from ``out/policy/checkpoint.json`` when present.
        progress: show the progress bar.

    Returns:
        0 on success.

    Raises:
        InfeasibleBudgetError: the budget is below the feasible minimum.
        PolicyMismatchError: ``resume`` with a checkpoint of another menu / env spec.
    """
    t0 = time.perf_counter()
    out = Path(out)
    total = int(total_steps if total_steps is not None else cfg.agent.total_steps)
    if total < 1:
        raise ConfigError(f"--total-steps must be >= 1, found {total}")
    prepared = pipeline.prepare(cfg, out, progress=progress)
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
    search = Search(prepared.tables, cfg, lambda p: pipeline.validate_plan(prepared, p),
                    prepared.dense_val(), tb_dir=tb_dir, progress=prog, models=models,
                    purge_step=done or None)
    if state.get("tracker"):
        search.tracker.restore(state["tracker"])
    wall0 = float(state.get("wall_seconds", 0.0))
    if search.writer is not None:
        search.writer.config(dump_config(cfg))

    def checkpoint() -> None:
        save_policy(policy_dir, search.models, cfg, prog.steps)
        atomic_write_json(policy_dir / CHECKPOINT, {
            "steps": prog.steps, "total_steps": total, "tracker": search.tracker.state(),
            "wall_seconds": wall0 + time.perf_counter() - t0})

    try:
        with _terminate_as_interrupt():
            search.train(total, checkpoint)
            search.final_candidates()
            checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise
    finally:
        prog.close()
        search.close()
    plan, value_val = _best_plan(search, cfg, {"env_steps": prog.steps})
    evals = (search.oracle.evaluations if search.oracle else 0) + corrections["evaluations"]
    selection = {"metric_val": value_val if math.isfinite(value_val) else None,
                 "evaluations": evals, "metric_calls": evals, "corrections": corrections,
                 "forward_samples": search.oracle.samples if search.oracle else 0}
    extra = {"env_steps": prog.steps, "episodes": search.tracker.episodes,
             "form": cfg.agent.form, "layer_controller": cfg.agent.layer_controller,
             "channel_controller": cfg.agent.channel_controller}
    res = pipeline.write_run(out, pipeline.resolved_config(prepared), prepared, plan, "rl",
                             pipeline.evaluate_plan(prepared, plan),
                             wall0 + time.perf_counter() - t0, extra=extra, selection=selection)
    _print(res, out, f"{prog.steps} env steps")
    return 0


def _policy_folder(policy: str | Path) -> Path:
    p = Path(policy)
    return p / "policy" if (p / "policy").is_dir() else p


def run_apply(cfg: Config, out: str | Path, policy_dir: str | Path, finetune_steps: int = 0,
              progress: bool = True) -> int:
    """``automl-compress apply``: compress the configured model with a trained policy.

    Args:
        cfg: the resolved config of the target model (its menu and env spec must match the
            policy's; the controllers' form is taken from the policy's manifest).
        out: the run directory.
        policy_dir: a train run directory (or its ``policy/`` folder).
        finetune_steps: env steps of fine-tuning on the target model (0 = zero-shot: one
            deterministic rollout).
        progress: show the progress bar.

    Raises:
        PolicyMismatchError: the policy's feature spec, menu or env spec does not fit.
        InfeasibleBudgetError: the budget is below the feasible minimum.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if finetune_steps < 0:
        raise ConfigError(f"--finetune-steps must be >= 0, found {finetune_steps}")
    pdir = _policy_folder(policy_dir)
    manifest = read_manifest(pdir)
    ctrl = manifest.get("controllers", {})
    try:
        cfg = dataclasses.replace(cfg, agent=dataclasses.replace(cfg.agent, **ctrl))
    except (TypeError, ConfigError) as exc:
        raise PolicyMismatchError(f"the policy manifest's controllers {ctrl!r} are not valid "
                                  f"here ({exc}); re-train the policy") from None
    check_manifest(manifest, cfg)
    prepared = pipeline.prepare(cfg, out, progress=progress)
    _check_budget(prepared, cfg)
    corrections = pipeline.choose_corrections(
        prepared, pipeline.allocate(prepared, "dp", cfg.env.budget_bits))
    cfg = dataclasses.replace(cfg, eval=prepared.cfg.eval)
    models = load_models(pdir, controller_names(cfg))
    prog = Progress(max(finetune_steps, 1), 0, show=progress and finetune_steps > 0)
    if finetune_steps == 0:
        cfg_run = dataclasses.replace(cfg, agent=dataclasses.replace(cfg.agent,
                                                                     final_candidates=1))
    else:
        cfg_run = cfg
    try:
        search = Search(prepared.tables, cfg_run, lambda p: pipeline.validate_plan(prepared, p),
                        prepared.dense_val(), tb_dir=out / "tb", progress=prog,
                        models=models)
    except ValueError as exc:
        raise PolicyMismatchError(f"the policy's spaces do not fit this model's env: {exc}") \
            from None
    try:
        if search.writer is not None:
            search.writer.config(dump_config(cfg))
        if finetune_steps > 0:
            search.train(finetune_steps)
        search.final_candidates()
        if finetune_steps > 0:
            save_policy(out / "policy", search.models, cfg, prog.steps)
    finally:
        prog.close()
        search.close()
    plan, value_val = _best_plan(search, cfg, {"policy": str(pdir),
                                               "finetune_steps": finetune_steps})
    evals = (search.oracle.evaluations if search.oracle else 0) + corrections["evaluations"]
    selection = {"metric_val": value_val if math.isfinite(value_val) else None,
                 "evaluations": evals, "metric_calls": evals, "corrections": corrections,
                 "forward_samples": search.oracle.samples if search.oracle else 0}
    extra = {"policy": str(pdir), "policy_model_family": manifest.get("model_family"),
             "finetune_steps": int(finetune_steps), "zero_shot": finetune_steps == 0,
             "env_steps": prog.steps if finetune_steps else 0,
             "episodes": search.tracker.episodes, "form": cfg.agent.form}
    res = pipeline.write_run(out, pipeline.resolved_config(prepared), prepared, plan, "rl",
                             pipeline.evaluate_plan(prepared, plan), time.perf_counter() - t0,
                             extra=extra, selection=selection)
    _print(res, out, "zero-shot" if finetune_steps == 0 else f"{finetune_steps} fine-tune steps")
    return 0
