"""``automl-compress compress``: a plan from an allocator or a search.

The allocators are uniform, dp and rtn, the searches evo and spdy; the plan is scored on the test
split and written to the run directory.
"""

from __future__ import annotations

import time
from pathlib import Path

from automl_compress import pipeline, selection
from automl_compress.commands import rundir
from automl_compress.config import Config
from automl_compress.executors import open_executor
from automl_compress.objectives import describe


def objective_line(prepared: pipeline.Prepared, choice: dict) -> str:
    """The objective a run used, and the validation scores it was chosen on (``auto``)."""
    line = describe(prepared.objective) if prepared.objective else "objective raw"
    scores = choice.get("scores")
    if choice.get("chosen_on") == "validation" and scores:
        line += " (chosen on validation: " + ", ".join(
            f"{name} {value:.4f}" for name, value in scores.items()) + ")"
    return line


def run(cfg: Config, method: str, out: str | Path, evaluations: float | None = None) -> int:
    """Compress the task at ``cfg.env.budget_bits`` and write the run directory.

    Prepares the task (on ``cfg.executor``), compresses it, evaluates the plan, writes the run
    directory and prints its summary line.

    Args:
        cfg: the resolved config.
        method: one of :data:`automl_compress.pipeline.METHODS`.
        out: the run directory (the database goes to ``out/db``).
        evaluations: 'evo'/'spdy': the validation passes to spend (default
            ``alloc.evaluations``).

    Returns:
        0 on success.

    Raises:
        InfeasibleBudgetError: the budget is below what the method can reach.
        ConfigError: an unknown method, or too few ``evaluations``.
        ExecutorError: ``executor.kind=ray`` without Ray, or an unreachable cluster.
    """
    t0 = time.perf_counter()
    with open_executor(cfg.executor) as ex:
        prepared = pipeline.prepare(cfg, out, executor=ex)
        plan, sel = selection.compress(prepared, method, float(cfg.env.budget_bits),
                                       evaluations)
    print(objective_line(prepared, sel.get("objective_choice", {})))
    value = pipeline.evaluate_plan(prepared, plan)
    extra = {k: sel[k] for k in ("start_val", "history", "coefficients") if k in sel}
    res = rundir.write_run(out, pipeline.resolved_config(prepared), prepared, plan, method, value,
                           time.perf_counter() - t0, extra=extra, selection=sel)
    rundir.print_summary(res, out)
    return 0
