"""Rewards of the compression environments (docs/env.md §1.1, §3).

An episode's return is the sum of a per-step term read from the exact tables and an episode-end
term from the true task metric of the stitched model:

    r_t   = − w_step · ΔE_t / E_ref
    r_end = w_metric · 10 · (m − m_dense) / |m_dense|          (only when m was measured)

- ΔE_t is the exact table error (0.5 (w−ŵ)H(w−ŵ)ᵀ summed over rows) that step t fixed: a layer
  step in the layer env fixes a whole layer, a group step fixes the group's rows (rows a layer
  decision removes are charged to the next step). The per-step terms of an episode sum to
  −w_step · plan_error / E_ref, the proxy the DP allocator minimises.
- E_ref is the model's *reference error*: per layer, the error of the best single option whose
  bits fit the budget's average (all rows the same; the 0-bit error where none fits), summed over
  layers. A plan as good as that uniform reference earns −w_step in step terms, a better one more;
  the scale is the same for every model and budget.
- m is the held-out metric of the stitched model after BN re-estimation / bias correction (higher
  is better), m_dense the dense model's. 10 · relative change is HAQ's 0.1 · Δaccuracy[%] for
  accuracy-like metrics. The metric is measured by a callable that may skip episodes (the
  orchestrator measures every ``env.metric_every``-th episode and the final candidates); a skipped
  episode has r_end = 0 and reports ``metric = nan`` in ``info``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from automl_compress.database.tables import LayerTable


def reference_error(tables: Sequence[LayerTable], option_bits: Sequence[np.ndarray],
                    budget_avg_bits: float) -> float:
    """E_ref: per layer the best uniform option within the average budget, summed.

    Args:
        tables: layer tables.
        option_bits: per table, (patterns, bits) bits per row (metadata included).
        budget_avg_bits: budget in average bits per compressible weight.
    """
    total = 0.0
    for t, ob in zip(tables, option_bits, strict=True):
        layer_err = t.errors.sum(axis=0)  # (patterns, bits)
        fits = ob * t.info.rows <= budget_avg_bits * t.info.numel + 1e-9
        worst = float(layer_err.max())
        total += float(layer_err[fits].min()) if fits.any() else worst
    return max(total, 1e-30)


def step_reward(delta_error: float, e_ref: float, weight: float) -> float:
    """The per-step term −w · ΔE / E_ref as a Python float."""
    return float(-weight * delta_error / e_ref)


def metric_reward(metric: float | None, metric_dense: float, weight: float) -> float:
    """The episode-end term w · 10 · (m − m_dense)/|m_dense|; 0.0 when m was not measured."""
    if metric is None or not math.isfinite(metric):
        return 0.0
    return float(weight * 10.0 * (metric - metric_dense) / max(abs(metric_dense), 1e-12))
