"""``automl-compress train``: train the RL controllers and write the best plan.

The run directory gets ``plan.json`` / ``results.json`` (method ``rl``: the best plan on the
validation split, reported on the test split) / ``policy/`` (checkpoints included, for
``--resume``) / ``tb/``. While training, SIGTERM (a plain ``kill``) acts as Ctrl-C: a checkpoint
is written and the command exits with code 130.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from automl_compress import pipeline
from automl_compress.agents import run as agent_run
from automl_compress.commands import rundir
from automl_compress.config import Config
from automl_compress.executors import open_executor


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises KeyboardInterrupt (so a checkpoint is written).

    The previous handler is restored afterwards. Off the main thread, signals cannot be handled:
    nothing changes.
    """
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


def run(cfg: Config, out: str | Path, total_steps: int | None = None, resume: bool = False,
        progress: bool = True, evaluations: float | None = None) -> int:
    """Search with the RL controllers (on ``cfg.executor``) and write the run directory.

    Prints the run's line beside dp and uniform at the same budget.

    Args:
        cfg: the resolved config (budget ``cfg.env.budget_bits``; ``env.budget_range`` trains
            one policy for the whole range).
        out: the run directory (the database goes to ``out/db``).
        total_steps: env steps at most (default ``cfg.agent.total_steps``).
        resume: continue from ``out/policy/checkpoint.json`` when present.
        progress: show the progress bar.
        evaluations: the validation passes training may spend (the choice of objective and
            corrections and the final candidates included; default ``cfg.alloc.evaluations``);
            training stops when they are spent or after ``total_steps``.

    Returns:
        0 on success.

    Raises:
        ConfigError: ``total_steps`` below 1, or too few ``evaluations``.
        InfeasibleBudgetError: a budget is below the feasible minimum.
        PolicyMismatchError: ``resume`` with a checkpoint of another menu / env spec.
        ExecutorError: ``executor.kind=ray`` without Ray, or an unreachable cluster.
    """
    out = Path(out)
    with open_executor(cfg.executor) as ex:
        t0 = time.perf_counter()
        total = agent_run.training_steps(cfg, total_steps)
        prepared = pipeline.prepare(cfg, out, progress=progress, executor=ex)
        training = agent_run.start_training(prepared, out / "policy", total, evaluations,
                                            resume, started=t0)
        if training.resumed_steps is not None:
            print(f"resuming from step {training.resumed_steps} of {total}")
        elif resume:
            print(f"no checkpoint in {out / 'policy'}; starting a new search")
        with terminate_as_interrupt():
            result = training.run(out / "tb", progress)
        res = rundir.write_run(out, pipeline.resolved_config(prepared), prepared, result.plan,
                               "rl", pipeline.evaluate_plan(prepared, result.plan),
                               result.wall_before + time.perf_counter() - t0,
                               extra=result.extra, selection=result.selection)
        rundir.print_against_baselines(prepared, res, out, f"{result.steps} env steps")
    return 0
