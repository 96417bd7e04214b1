"""The task contract: a model, its calibration and held-out data, and its metric."""

from __future__ import annotations

import hashlib
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


@dataclass(frozen=True)
class Task:
    """What a compression run works on.

    Attributes:
        name: registry key or dotted path the task came from.
        family: model family, recorded in policy manifests (e.g. ``"digits_cnn"``, ``"crepe"``).
        model: the dense model in eval mode, on the CPU. Never modified by the library.
        calib: calibration batches (model inputs only), used for Hessians, BN re-estimation and
            bias correction.
        evaluate: ``evaluate(model) -> float``, the task metric on a held-out split that
            calibration never saw; higher is better.
        metric_name: name of that metric (e.g. ``"top1"``).
        forward: how to run the model on one calibration batch.
        report: optional ``report(model) -> {name: value}``, secondary held-out metrics written
            to results.json under ``metrics`` (e.g. MiniLM's retrieval agreement).
    """

    name: str
    family: str
    model: nn.Module
    calib: Sequence[Any]
    evaluate: Callable[[nn.Module], float]
    metric_name: str
    forward: Callable[[nn.Module, Any], Any] = default_forward
    report: Callable[[nn.Module], dict[str, float]] | None = None

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
