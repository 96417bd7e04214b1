"""The task contract: a model, its calibration data, a validation and a test split, its metric.

Three disjoint sets of inputs (docs/objectives.md, "Splits"): calibration batches (Hessians,
statistics corrections, the calibrated objectives), a validation split that every search selects
on (``Task.validate``), and a test split that only reports (``Task.evaluate``). A task without a
validation split gets one cut from its calibration batches by :func:`with_validation`, scored by
fidelity to the dense model's outputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Call the model on one calibration batch: a tensor, a tuple of tensors or a dict of them."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


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
                s = self.score(model, _to_device(batch, device)).double().reshape(-1).cpu()
                scores.append(s)
                count += len(s)
                if limit is not None and count >= limit:
                    break
        finally:
            model.train(was_training)
        if self.sizes is None:
            self.sizes = [len(s) for s in scores]
        return float(torch.cat(scores)[: self.items(fraction)].mean())


@dataclass(frozen=True)
class Task:
    """What a compression run works on.

    Attributes:
        name: registry key or dotted path the task came from.
        family: model family, recorded in policy manifests (e.g. ``"digits_cnn"``, ``"crepe"``).
        model: the dense model in eval mode, on the CPU. Never modified by the library.
        calib: calibration batches (model inputs only), used for Hessians, BN re-estimation,
            bias correction and the calibrated objectives.
        evaluate: ``evaluate(model) -> float``, the task metric on the test split that neither
            calibration nor any search ever sees; higher is better. Only reported.
        metric_name: name of that metric (e.g. ``"top1"``).
        forward: how to run the model on one calibration batch.
        report: optional ``report(model) -> {name: value}``, secondary test-split metrics written
            to results.json under ``metrics`` (e.g. MiniLM's retrieval agreement).
        validate: ``validate(model, fraction=1.0) -> float``, the same metric on a validation
            split disjoint from calibration and test, scored on its first ``fraction`` of items
            (an :class:`ItemMetric`); what every search selects on. None: :func:`with_validation`
            cuts one from the calibration batches.
        distance: the output distance of the calibrated objectives and of fidelity metrics
            (``kl`` for classifiers, ``cosine`` for embeddings, ``mse`` otherwise;
            :mod:`automl_compress.distances`).
    """

    name: str
    family: str
    model: nn.Module
    calib: Sequence[Any]
    evaluate: Callable[[nn.Module], float]
    metric_name: str
    forward: Callable[[nn.Module, Any], Any] = default_forward
    report: Callable[[nn.Module], dict[str, float]] | None = None
    validate: Callable[..., float] | None = None
    distance: str = "mse"

    def calib_fingerprint(self) -> str:
        """SHA-256 over the calibration tensors (values, shapes, dtypes)."""
        h = hashlib.sha256()

        def feed(x: Any) -> None:
            if isinstance(x, torch.Tensor):
                t = x.detach().cpu().contiguous()
                h.update(str((tuple(t.shape), str(t.dtype))).encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            elif isinstance(x, dict):
                for k in sorted(x):
                    h.update(str(k).encode())
                    feed(x[k])
            elif isinstance(x, (tuple, list)):
                for v in x:
                    feed(v)
            else:
                h.update(repr(x).encode())

        for batch in self.calib:
            feed(batch)
        return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over a model's state dict (names, shapes, values)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    """Per-item fidelity of a model's outputs to ``dense``'s on ``batches`` (higher is better):
    −KL, cosine or −relative squared error (:meth:`~automl_compress.distances.Distance.fidelity`),
    the dense outputs computed once here.

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
