"""``automl-compress apply``: compress the configured model with a trained policy.

The policy is used zero-shot or fine-tuned, and the run directory is written.
"""

from __future__ import annotations

import time
from pathlib import Path

from automl_compress import pipeline
from automl_compress.agents import run as agent_run
from automl_compress.commands import rundir
from automl_compress.config import Config


def run(cfg: Config, out: str | Path, policy_dir: str | Path, finetune_steps: int = 0,
        progress: bool = True, evaluations: float | None = None, check_dp: bool = False) -> int:
    """Apply the policy at ``cfg.env.budget_bits`` and write the run directory.

    A fine-tuned policy goes under ``out/policy``. Prints the run's line beside dp and uniform at
    the same budget.

    Args:
        cfg: the resolved config of the target model (its menu and env spec must match the
            policy's; the controllers' form is taken from the policy's manifest).
        out: the run directory (the database goes to ``out/db``).
        policy_dir: a train run directory (or its ``policy/`` folder).
        finetune_steps: env steps of fine-tuning on the target model (0 = zero-shot).
        progress: show the progress bar.
        evaluations: fine-tuning's validation budget (corrections and final candidates
            included).
        check_dp: zero-shot: keep the better of the rollout and the DP plan on validation
            (on another model, under the objective and corrections chosen there).

    Returns:
        0 on success.

    Raises:
        ConfigError: negative ``finetune_steps``; ``check_dp`` with fine-tuning.
        PolicyMismatchError: the policy's feature spec, menu or env spec does not fit.
        InfeasibleBudgetError: the budget is below the feasible minimum.
    """
    t0 = time.perf_counter()
    out = Path(out)
    source = agent_run.open_policy(cfg, policy_dir, finetune_steps, evaluations, check_dp)
    prepared = pipeline.prepare(source.cfg, out, progress=progress)
    result = agent_run.apply_policy(prepared, source, finetune_steps, evaluations,
                                    tb_dir=out / "tb", save_dir=out / "policy",
                                    progress=progress)
    res = rundir.write_run(out, pipeline.resolved_config(prepared), prepared, result.plan, "rl",
                           pipeline.evaluate_plan(prepared, result.plan),
                           time.perf_counter() - t0, extra=result.extra,
                           selection=result.selection)
    label = "zero-shot" if source.zero_shot else f"fine-tuned {result.steps} steps"
    if result.extra.get("incumbent_lent_from") is not None:
        label += f" from the policy's {result.extra['incumbent_lent_from']:g}-bit plan"
    if result.extra.get("checked_against_dp"):
        label += f", checked against dp (kept the {result.plan.meta['kept']} plan)"
    rundir.print_against_baselines(prepared, res, out, label)
    return 0
