"""The task contract: a model, its calibration data, a validation and a test split, its metric.

:class:`Task` itself is defined in :mod:`automl_compress.specs` (capture and the database read it
too) and re-exported here, where user code finds it (``automl_compress.zoo.base.Task``); this
module adds the metrics a task is built from.

Three disjoint sets of inputs (docs/objectives.md, "Splits"): calibration batches (Hessians,
statistics corrections, the calibrated objectives), a validation split that every search selects
on (``Task.validate``), and a test split that only reports (``Task.evaluate``). A task without a
validation split gets one cut from its calibration batches by :func:`with_validation`, scored by
fidelity to the dense model's outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from automl_compress.specs import Task, default_forward, model_fingerprint, to_device

__all__ = [
    "ItemMetric",
    "Task",
    "default_forward",
    "fidelity_metric",
    "model_device",
    "model_fingerprint",
    "with_validation",
]


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class ItemMetric:
    """A metric that is a mean over items, computable on a prefix of its split.

    ``metric(model)`` scores the whole split; ``metric(model, fraction)`` the first
    ``ceil(fraction · size)`` items (searches select on growing subsets, EvoPress-style).

    Args:
        batches: the split, in a fixed order; each batch as the score function takes it.
        score: ``(model, batch) -> (items,)`` per-item scores (higher is better), on the model's
            device, called with the model in eval mode under ``torch.no_grad``.
    """

    def __init__(self, batches: Sequence[Any],
                 score: Callable[[nn.Module, Any], torch.Tensor]) -> None:
        self.batches, self.score = list(batches), score
        self.sizes: list[int] | None = None

    @property
    def size(self) -> int:
        """Items in the split (known after the first call)."""
        return sum(self.sizes) if self.sizes is not None else 0

    def items(self, fraction: float = 1.0) -> int:
        """How many items ``fraction`` of the split scores (known after the first call)."""
        return min(self.size, max(1, math.ceil(fraction * self.size)))

    @torch.no_grad()
    def __call__(self, model: nn.Module, fraction: float = 1.0) -> float:
        """Mean per-item score of ``model`` on the first ``fraction`` of the split."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], found {fraction}")
        device = model_device(model)
        was_training = model.training
        model.eval()
        # the first call scores every batch (to learn the split's size), later ones the prefix
        limit = self.items(fraction) if self.sizes is not None else None
        scores, count = [], 0
        try:
            for batch in self.batches:
                s = self.score(model, to_device(batch, device)).double().reshape(-1).cpu()
                scores.append(s)
                count += len(s)
                if limit is not None and count >= limit:
                    break
        finally:
            model.train(was_training)
        if self.sizes is None:
            self.sizes = [len(s) for s in scores]
        return float(torch.cat(scores)[: self.items(fraction)].mean())


VAL_SHARE = 0.25


def with_validation(task: Task) -> Task:
    """The task itself when it has a validation split; else one cut from its calibration batches.

    The last ``ceil(VAL_SHARE · n)`` of the n calibration batches become the validation split
    (so calibration keeps the rest), scored by fidelity to the dense model's outputs under
    ``task.distance`` (:meth:`~automl_compress.distances.Distance.fidelity`: −KL, cosine or
    −relative squared error; 0 or 1 for the dense model). A warning says so.

    Raises:
        TaskError: fewer than two calibration batches, or outputs that are not tensors.
    """
    if task.validate is not None:
        return task
    from automl_compress.errors import TaskError

    batches = list(task.calib)
    if len(batches) < 2:
        raise TaskError(
            f"task {task.name!r} has no validation split (Task.validate) and only "
            f"{len(batches)} calibration batch; give it a validate metric or at least two "
            "calibration batches (one quarter of them becomes the validation split)"
        )
    n_val = max(1, math.ceil(VAL_SHARE * len(batches)))
    calib, val = batches[:-n_val], batches[-n_val:]
    validate = fidelity_metric(task.model, task.forward, task.distance, val, task.name)
    warnings.warn(
        f"task {task.name!r} has no validation split: the last {n_val} of its {len(batches)} "
        f"calibration batches are held out for it (fidelity to the dense outputs, distance "
        f"{task.distance!r}); give the Task a validate metric to choose the split yourself",
        stacklevel=2,
    )
    return dataclasses.replace(task, calib=calib, validate=validate)


def fidelity_metric(dense: nn.Module, forward: Callable[[nn.Module, Any], Any], distance: str,
                    batches: Sequence[Any], where: str = "task") -> ItemMetric:
    """Per-item fidelity of a model's outputs to ``dense``'s on ``batches``.

    Higher is better: −KL, cosine or −relative squared error
    (:meth:`~automl_compress.distances.Distance.fidelity`), the dense outputs computed once here.

    Raises:
        InvalidInputError: the outputs are not one floating tensor per batch.
    """
    from automl_compress.distances import get_distance, output_tensor

    dist = get_distance(distance)
    with torch.no_grad():
        was_training = dense.training
        dense.eval()
        refs = [output_tensor(forward(dense, b), where).detach() for b in batches]
        dense.train(was_training)

    def score(model: nn.Module, pair: tuple[Any, torch.Tensor]) -> torch.Tensor:
        batch, ref = pair
        return dist.fidelity(output_tensor(forward(model, batch), where), ref.to(
            model_device(model)))

    return ItemMetric(list(zip(batches, refs, strict=True)), score)


_HF_OFFLINE_VARS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@contextlib.contextmanager
def hf_offline() -> Iterator[None]:
    """Set the Hugging Face offline variables for the duration of a load, then restore them."""
    saved = {k: os.environ.get(k) for k in _HF_OFFLINE_VARS}
    os.environ.update(_HF_OFFLINE_VARS)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
