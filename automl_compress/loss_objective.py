"""The ``loss`` objective's measurements: the model's output distance with one layer compressed.

OBC's measured objective (docs/objectives.md §3): for every layer × option (the option on all
of the layer's rows, every other layer dense) the mean distance D of the corrected, stitched
model's outputs to the dense outputs on a few calibration batches, written after every layer so an
interrupted measurement resumes; then one weight per layer, the geometric-mean ratio of measured
D to table error over its options. :mod:`automl_compress.objectives` caches and checks the result.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from automl_compress.database.tables import LayerTable
from automl_compress.distances import get_distance, output_tensor
from automl_compress.io import atomic_write_json
from automl_compress.plan import CompressionPlan, LayerPlan
from automl_compress.specs import Task


def option_key(pattern: str, bits: int) -> str:
    """The key of one option in the ``loss`` measurements."""
    return f"{pattern}/{bits}"


@torch.no_grad()
def mean_distance(model: nn.Module, task: Task, batches: Sequence[Any],
                  refs: Sequence[torch.Tensor]) -> float:
    """Mean over items of D(model outputs, dense outputs) on ``batches``."""
    dist = get_distance(task.distance)
    total, items = 0.0, 0
    model.eval()
    for batch, ref in zip(batches, refs, strict=True):
        d = dist.value(output_tensor(task.forward(model, batch), task.name), ref)
        total += float(d.sum())
        items += d.shape[0]
    return total / max(items, 1)


def fit_layer_weight(errors: np.ndarray, measured: np.ndarray) -> float:
    """The ``loss`` objective's weight of one layer.

    ``exp(mean(log D_o − log E_o))`` over the options o with E_o > 0 and D_o > 0 (0 when no option
    moved the outputs).
    """
    ok = (errors > 0) & (measured > 0)
    if not ok.any():
        return 0.0
    return float(np.exp(np.mean(np.log(measured[ok]) - np.log(errors[ok]))))


def measure_layer_options(
    task: Task, tables: Sequence[LayerTable], corrected: Callable[[CompressionPlan], nn.Module],
    batches: int, partial: Path | None = None, progress: bool = True,
) -> tuple[dict[str, dict[str, float]], float]:
    """D of the model with one layer at one option (all its rows), every other layer dense.

    Args:
        task: the task (calibration batches, forward, distance).
        tables: the raw layer tables (options and errors).
        corrected: ``plan -> model``: the stitched, statistics-corrected copy of the model.
        batches: how many calibration batches D is measured on.
        partial: a JSON file holding finished layers (read to resume, written after each layer).
        progress: show a bar.

    Returns:
        (layer → {"pattern/bits": D}, forward passes taken).
    """
    subset = list(task.calib)[:max(1, batches)]
    with torch.no_grad():
        task.model.eval()
        refs = [output_tensor(task.forward(task.model, b), task.name).detach() for b in subset]
    done: dict[str, dict[str, float]] = {}
    if partial is not None and partial.is_file():
        done = json.loads(partial.read_text()).get("measured", {})
    passes = 0.0
    bar = tqdm(total=len(tables), initial=sum(t.info.name in done for t in tables), unit="layer",
               desc="objective loss", disable=not progress, dynamic_ncols=True)
    try:
        for t in tables:
            if t.info.name in done:
                continue
            row: dict[str, float] = {}
            for p in t.patterns:
                for b in t.bits:
                    if b == 0 and p != t.patterns[0]:
                        continue  # a removed row is the same under every pattern
                    plan = CompressionPlan({t.info.name: LayerPlan(p, (int(b),) * t.info.rows)})
                    row[option_key(p, b)] = mean_distance(corrected(plan), task, subset, refs)
                    passes += len(subset)
            done[t.info.name] = row
            if partial is not None:
                atomic_write_json(partial, {"measured": done})
            bar.update(1)
    finally:
        bar.close()
    return done, passes


def loss_weights(tables: Sequence[LayerTable],
                 measured: dict[str, dict[str, float]]) -> dict[str, np.ndarray]:
    """Per-row weights of the ``loss`` objective (one :func:`fit_layer_weight` per layer)."""
    out = {}
    for t in tables:
        row = measured[t.info.name]
        errs, meas = [], []
        for key, d in row.items():
            p, b = key.rsplit("/", 1)
            errs.append(float(t.errors[:, t.patterns.index(p), t.bits.index(int(b))].sum()))
            meas.append(d)
        c = fit_layer_weight(np.asarray(errs), np.asarray(meas))
        out[t.info.name] = np.full(t.info.rows, c)
    return out
