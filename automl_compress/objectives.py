"""Calibrated objectives: per-row weights that put every layer's errors on the model's scale.

A layer table holds the exact error ``E_lr = ½ (w−ŵ) H (w−ŵ)ᵀ`` of every row r of layer l at every
option: a mean squared change of that row's output, on that layer's own scale. Summed across
layers it misleads every allocator (a grouped conv before a BatchNorm looks cheap to prune and is
not). An objective gives every row a weight ``c_lr`` and the allocators minimise
``Σ_lr c_lr · E_lr`` instead; per-row weights keep the in-layer knapsack exact. The maths and the
measurements that chose the default are in docs/objectives.md.

- ``raw``: ``c = 1`` (the uncalibrated sum, kept as an ablation).
- ``normalized``: ``c_l = 1 / energy_l``, the layer's dense output energy
  ``Σ_r ½ w_r H w_rᵀ`` (its output's mean squared value without the bias; the variance with a
  centred H), so ``c_l E_l`` is the layer's relative output error.
- ``fisher``: ``c_lr = ½ E_items[Σ_positions ∂D/∂y_lr ²]`` estimated with probes: the diagonal
  Gauss-Newton matrix of the output distance D (:mod:`automl_compress.distances`) with respect to
  the row's outputs, so ``Σ c_lr E_lr`` is the second-order prediction of D's increase. A
  BatchNorm or LayerNorm after the layer is accounted for by the backward pass.
- ``loss``: OBC's measured objective: for every layer × option (the option on all rows of that
  layer, every other layer dense), the mean distance D of the corrected model's outputs to the
  dense outputs on the first ``alloc.loss_batches`` calibration batches; the layer's weight is
  the geometric-mean ratio of measured D to table error over its options (measured in
  automl_compress/loss_objective.py).

Objectives are computed once per database and cached beside it under ``objectives/`` (the file
name hashes the database fingerprints and the objective's settings); the ``loss`` measurements are
written after every layer, so an interrupted computation resumes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from automl_compress.database.tables import LayerTable
from automl_compress.distances import get_distance, output_tensor
from automl_compress.errors import ObjectiveError
from automl_compress.io import atomic_write_json
from automl_compress.loss_objective import loss_weights, measure_layer_options
from automl_compress.plan import CompressionPlan
from automl_compress.specs import Task

OBJECTIVE_VERSION = 1


class ObjectiveName(StrEnum):
    """The calibrated objectives (``alloc.objective``)."""

    RAW = "raw"
    NORMALIZED = "normalized"
    FISHER = "fisher"
    LOSS = "loss"


@dataclass(frozen=True)
class Objective:
    """Per-row weights of every layer's table errors.

    Attributes:
        name: which objective.
        weights: layer name → (rows,) float64 weights ``c_lr`` (finite, ≥ 0).
        cost: what computing it took: ``forward_passes``, ``backward_passes`` (calibration
            batches through the model) and ``seconds``.
        measured: ``loss`` only: layer name → {"pattern/bits": measured mean distance}.
    """

    name: ObjectiveName
    weights: dict[str, np.ndarray]
    cost: dict[str, float] = field(default_factory=dict)
    measured: dict[str, dict[str, float]] | None = None


def weigh(tables: Sequence[LayerTable], objective: Objective) -> list[LayerTable]:
    """The tables with every row's errors multiplied by its weight (raw: the tables themselves)."""
    if objective.name == ObjectiveName.RAW:
        return list(tables)
    out = []
    for t in tables:
        w = objective.weights[t.info.name]
        out.append(LayerTable(t.info, t.bits, t.patterns, t.errors * w[:, None, None]))
    return out


def _check_weights(weights: dict[str, np.ndarray], name: str) -> None:
    for layer, w in weights.items():
        bad = ~np.isfinite(w)
        if bad.any():
            raise ObjectiveError(
                f"the {name!r} objective gave non-finite weights for layer {layer!r} (rows "
                f"{np.flatnonzero(bad)[:8].tolist()}); expected finite numbers: check the model's "
                "outputs on the calibration batches for NaN/Inf, or use alloc.objective=normalized"
            )


# ---------------------------------------------------------------------------------------------
# normalized and fisher: one pass over the calibration batches (fisher: plus backward probes)


def _reduce_rows(y: torch.Tensor, module: nn.Module) -> tuple[torch.Tensor, int]:
    """Per-output-channel sum over every other dimension, and the entries per channel.

    The second value is the number of summed entries per channel (Linear: the last dimension is the
    channel; convs: dimension 1).
    """
    if isinstance(module, nn.Linear):
        flat = y.reshape(-1, y.shape[-1])
        return flat.sum(dim=0), flat.shape[0]
    flat = y.transpose(0, 1).reshape(y.shape[1], -1)
    return flat.sum(dim=1), flat.shape[1]


def _bias_shape(y: torch.Tensor, module: nn.Module, b: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return b
    return b.reshape(1, -1, *([1] * (y.dim() - 2)))


def output_energy(task: Task, names: Sequence[str], centered: bool = False) -> dict[str, float]:
    """Each layer's dense output energy on the calibration batches.

    ``Σ_r mean_n (y_rn − b_r)²`` (``Σ_r var_n y_rn`` when ``centered``), the sum of its rows' 0-bit
    table errors.
    """
    mods = dict(task.model.named_modules())
    acc: dict[str, list] = {n: [0.0, 0.0, 0] for n in names}

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            y = out.detach().double()
            b = getattr(module, "bias", None)
            if b is not None:
                y = y - _bias_shape(y, module, b.detach().double())
            s1, n = _reduce_rows(y, module)
            s2, _ = _reduce_rows(y * y, module)
            a = acc[name]
            a[0], a[1], a[2] = a[0] + s1, a[1] + s2, a[2] + n

        return fn

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    was_training = task.model.training
    task.model.eval()
    try:
        with torch.no_grad():
            for batch in task.calib:
                task.forward(task.model, batch)
    finally:
        for h in handles:
            h.remove()
        task.model.train(was_training)
    out = {}
    for n, (s1, s2, count) in acc.items():
        if not count:
            raise ObjectiveError(f"layer {n!r} was not called by the calibration forward; "
                                 "expected every compressible layer to run")
        mean_sq = s2 / count
        if centered:
            mean_sq = mean_sq - (s1 / count) ** 2
        out[n] = float(mean_sq.sum())
    return out


def fisher_diagonal(task: Task, names: Sequence[str], probes: int = 4,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """``c_lr = ½ E_items[Σ_positions (∂D/∂y_lr)²]`` per layer row, by random probes.

    Per calibration batch and probe, ``v`` with ``E[v vᵀ] = ∇²D`` at the dense outputs
    (:meth:`~automl_compress.distances.Distance.probe`) is back-propagated to every layer's
    outputs; ``E[(Jᵀv)²]`` is the diagonal of ``Jᵀ ∇²D J``. Runs on a copy of the model with
    gradients enabled (the user's model is untouched).

    Raises:
        ObjectiveError: the output is not a tensor, the forward disables gradients, or a weight
            is not finite.
    """
    dist = get_distance(task.distance)
    model = copy.deepcopy(task.model).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    mods = dict(model.named_modules())
    outs: dict[str, list[torch.Tensor]] = {}

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            outs.setdefault(name, []).append(out)

        return fn

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    acc = {n: torch.zeros(mods[n].weight.shape[0], dtype=torch.float64) for n in names}
    items = 0
    gen = torch.Generator().manual_seed(seed)
    try:
        for batch in task.calib:
            outs.clear()
            with torch.enable_grad():
                y = output_tensor(task.forward(model, batch), f"task {task.name!r}")
                if not y.requires_grad:
                    raise ObjectiveError(
                        f"task {task.name!r}: the model's forward returned an output without "
                        "gradients (torch.no_grad or detach inside forward?); the 'fisher' "
                        "objective back-propagates through the model: remove it, or use "
                        "alloc.objective=normalized or loss"
                    )
                missing = [n for n in names if n not in outs]
                if missing:
                    raise ObjectiveError(f"layers {missing[:4]} were not called by the forward")
                flat = [(n, t) for n in names for t in outs[n]]
                for k in range(probes):
                    v = dist.probe(y.detach(), gen).to(y.dtype)
                    grads = torch.autograd.grad(y, [t for _, t in flat], grad_outputs=v,
                                                retain_graph=k < probes - 1, allow_unused=True)
                    for (n, _), g in zip(flat, grads, strict=True):
                        if g is not None:
                            acc[n] += _reduce_rows(g.detach().double() ** 2, mods[n])[0].cpu()
            items += y.shape[0]
    finally:
        for h in handles:
            h.remove()
    weights = {n: (0.5 * a / (items * probes)).numpy() for n, a in acc.items()}
    _check_weights(weights, "fisher")
    return weights


# ---------------------------------------------------------------------------------------------
# The cached computation


@dataclass(frozen=True)
class ObjectiveSpec:
    """What an objective's value depends on besides the database (hashed into its cache name).

    Attributes:
        name: the objective.
        probes: ``fisher``: probes per calibration batch.
        loss_batches: ``loss``: calibration batches the distance is measured on.
        centered: whether the database's H is centred (``normalized``'s energy follows it).
        seed: ``fisher``: the probes' seed.
        corrections: ``loss``: the statistics corrections of the measured models.
    """

    name: ObjectiveName
    probes: int = 4
    loss_batches: int = 2
    centered: bool = False
    seed: int = 0
    corrections: tuple[str, ...] = ()

    def relevant(self) -> dict[str, Any]:
        """The fields the objective's value depends on (its name and version included)."""
        d: dict[str, Any] = {"name": str(self.name), "version": OBJECTIVE_VERSION}
        if self.name == ObjectiveName.FISHER:
            d.update(probes=self.probes, seed=self.seed)
        elif self.name == ObjectiveName.NORMALIZED:
            d.update(centered=self.centered)
        elif self.name == ObjectiveName.LOSS:
            d.update(loss_batches=self.loss_batches, corrections=list(self.corrections))
        return d


def cache_path(root: Path, spec: ObjectiveSpec, db_fingerprints: dict[str, Any]) -> Path:
    """``root/objectives/<name>-<hash of the database fingerprints and the spec>.json``."""
    blob = json.dumps({"db": db_fingerprints, "spec": spec.relevant()}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return Path(root) / "objectives" / f"{spec.name}-{digest}.json"


def _from_json(data: dict[str, Any]) -> Objective:
    return Objective(ObjectiveName(data["name"]),
                     {k: np.asarray(v, dtype=np.float64) for k, v in data["weights"].items()},
                     dict(data.get("cost", {})), data.get("measured"))


def compute_objective(
    spec: ObjectiveSpec, task: Task, tables: Sequence[LayerTable], root: Path,
    db_fingerprints: dict[str, Any],
    corrected: Callable[[CompressionPlan], nn.Module] | None = None, progress: bool = True,
) -> Objective:
    """The objective, from its cache file when present, else computed and cached.

    Args:
        spec: which objective and its settings.
        task: the task (calibration batches, forward, distance).
        tables: the raw layer tables (forward order).
        root: the database folder (the cache goes to ``root/objectives``).
        db_fingerprints: the database's fingerprints (part of the cache key).
        corrected: ``plan -> corrected stitched model``; needed by ``loss``.
        progress: show progress bars.

    Raises:
        ObjectiveError: the objective cannot be computed for this model.
    """
    names = [t.info.name for t in tables]
    if spec.name == ObjectiveName.RAW:
        return Objective(spec.name, {t.info.name: np.ones(t.info.rows) for t in tables})
    path = cache_path(root, spec, db_fingerprints)
    if path.is_file():
        return _from_json(json.loads(path.read_text()))
    t0 = time.perf_counter()
    n_batches = len(task.calib)
    measured = None
    if spec.name == ObjectiveName.NORMALIZED:
        energy = output_energy(task, names, spec.centered)
        weights = {t.info.name: np.full(t.info.rows, 1.0 / max(energy[t.info.name], 1e-300))
                   for t in tables}
        cost = {"forward_passes": n_batches, "backward_passes": 0}
    elif spec.name == ObjectiveName.FISHER:
        weights = fisher_diagonal(task, names, spec.probes, spec.seed)
        cost = {"forward_passes": n_batches, "backward_passes": n_batches * spec.probes}
    else:
        if corrected is None:
            raise ObjectiveError("the 'loss' objective needs the stitched, corrected model "
                                 "(pass corrected=...)")
        partial = path.with_suffix(".partial.json")
        measured, passes = measure_layer_options(task, tables, corrected, spec.loss_batches,
                                                 partial, progress)
        weights = loss_weights(tables, measured)
        _check_weights(weights, "loss")
        cost = {"forward_passes": passes, "backward_passes": 0}
    cost["seconds"] = time.perf_counter() - t0
    _check_weights(weights, str(spec.name))
    obj = Objective(spec.name, weights, cost, measured)
    atomic_write_json(path, {"name": str(spec.name), "spec": spec.relevant(),
                             "weights": {k: v.tolist() for k, v in weights.items()},
                             "cost": cost, "measured": measured})
    partial = path.with_suffix(".partial.json")
    partial.unlink(missing_ok=True)
    return obj


def describe(obj: Objective) -> str:
    """One line: the objective and what computing it cost."""
    c = obj.cost
    if not c:
        return f"objective {obj.name}"
    return (f"objective {obj.name}: {int(c.get('forward_passes', 0))} forward and "
            f"{int(c.get('backward_passes', 0))} backward batch passes, "
            f"{c.get('seconds', math.nan):.1f} s")
