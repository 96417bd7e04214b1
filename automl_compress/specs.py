"""The values every layer of the library passes around; this module imports nothing above it.

- :class:`LayerInfo`: the shape of one compressible layer (capture writes it, the database stores
  it, allocators, environments and exports read it).
- :class:`Pattern`: a layer sparsity pattern ('dense', 'N:M', 'P%') as a typed value.
- :class:`Task` and :func:`default_forward`: the task contract (a model, its calibration batches,
  its metrics) that capture, the database and evaluation read; the built-in tasks live in
  :mod:`automl_compress.zoo`, which re-exports these.
- :func:`to_device`: moves a batch (a tensor, or tuples, lists and dicts of them) to a device.

Capture, the database, the solvers' callers and the zoo import this module, never the other way
round (docs/architecture.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from automl_compress.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Layers


@dataclass(frozen=True)
class LayerInfo:
    """Shape metadata of one compressible layer.

    Attributes:
        name: module name in the model (``model.get_submodule(name)``).
        kind: 'linear', 'conv1d' or 'conv2d'.
        rows: output channels (weight rows).
        cols: weights per row (in_features, or C_in/groups × kernel area).
        kernel: kernel size (empty for linear).
        stride: stride (empty for linear).
        groups: conv groups (1 for linear).
        macs: multiply-accumulates per calibration sample (per forward of one input item).
        index: position among the compressible layers (0-based, forward order).
        has_bias: whether the layer has a bias.
    """

    name: str
    kind: str
    rows: int
    cols: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    groups: int = 1
    macs: int = 0
    index: int = 0
    has_bias: bool = False

    @property
    def numel(self) -> int:
        """Number of weights, ``rows · cols``."""
        return self.rows * self.cols


PatternKind = Literal["dense", "nm", "unstructured"]


@dataclass(frozen=True)
class Pattern:
    """A layer sparsity pattern: dense, N of every M kept (N:M), or a share of zeros per row.

    Attributes:
        kind: 'dense', 'nm' or 'unstructured'.
        n_m: (N, M) for 'nm', else None.
        sparsity: the share of zeros per row for 'unstructured' (in (0, 1)), else 0.
    """

    kind: PatternKind
    n_m: tuple[int, int] | None = None
    sparsity: float = 0.0

    @classmethod
    def parse(cls, p: str) -> Pattern:
        """``"dense"``, ``"N:M"`` with 0 < N < M, or ``"P%"`` with 0 < P < 100.

        >>> Pattern.parse("2:4").n_m, Pattern.parse("75%").sparsity
        ((2, 4), 0.75)

        Raises:
            ConfigError: anything else.
        """
        p = str(p).strip()
        if p == "dense":
            return cls("dense")
        if ":" in p:
            n, m = p.split(":", 1)
            if n.isdigit() and m.isdigit() and 0 < int(n) < int(m):
                return cls("nm", n_m=(int(n), int(m)))
        if p.endswith("%"):
            try:
                s = float(p[:-1]) / 100.0
            except ValueError:
                s = -1.0
            if 0.0 < s < 1.0:
                return cls("unstructured", sparsity=s)
        raise ConfigError(
            f"sparsity pattern must be 'dense', 'N:M' with 0 < N < M (e.g. '2:4') or a percentage "
            f"in (0, 100) (e.g. '50%'), found {p!r}"
        )

    @property
    def arg(self) -> float | tuple[int, int] | None:
        """The pattern's parameter in the old tuple form: (N, M), the sparsity, or None."""
        return {"dense": None, "nm": self.n_m, "unstructured": self.sparsity}[self.kind]

    def kept(self, cols: int) -> int:
        """How many of a row's ``cols`` weights the pattern keeps."""
        if self.n_m is not None:
            n, m = self.n_m
            return cols // m * n
        if self.kind == "unstructured":
            return cols - int(round(self.sparsity * cols))
        return cols

    def fits(self, cols: int) -> bool:
        """Whether a row of ``cols`` weights can take the pattern (N:M needs cols % M == 0)."""
        return self.n_m is None or cols % self.n_m[1] == 0


# ---------------------------------------------------------------------------------------------
# Tasks


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Call the model on one calibration batch: a tensor, a tuple of tensors or a dict of them."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def to_device(batch: Any, device: torch.device | str) -> Any:
    """The batch with every tensor in it (through tuples, lists and dicts) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


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
            (a :class:`~automl_compress.zoo.base.ItemMetric`); what every search selects on.
            None: :func:`~automl_compress.zoo.base.with_validation` cuts one from the calibration
            batches.
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
