"""Which modules of a model capture hooks: :func:`select_layers` and :class:`UnsupportedLayer`.

The supported layers are ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` with zero padding; every
other weight-holding module that a name pattern matches is reported as unsupported, with the
reason, rather than dropped silently.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from automl_compress.attention import UnfusedMultiheadAttention

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class UnsupportedLayer:
    """A weight-holding module that the solvers cannot compress and that capture skipped.

    Attributes:
        name: module name in the model.
        type_name: the module's class name.
        reason: why it was skipped.
    """

    name: str
    type_name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({self.type_name}): {self.reason}"


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _mha_children(model: nn.Module) -> set[str]:
    """Names of the submodules every ``nn.MultiheadAttention`` of the model uses functionally."""
    out: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            prefix = f"{name}." if name else ""
            out.update(f"{prefix}{c}" for c, _ in module.named_children())
    return out


def _supported_reason(name: str, module: nn.Module, mha_children: set[str]) -> str | None:
    """Why a supported-type layer still cannot be captured, or None when it can."""
    if name in mha_children:
        return "weights used functionally by MultiheadAttention (hooks never see them)"
    if not isinstance(module, nn.Linear) and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return "lazy layer not initialised"
    return None


def _other_reason(module: nn.Module) -> str | None:
    """Why a module of another type is reported as unsupported, or None to ignore it."""
    if isinstance(module, nn.MultiheadAttention):
        return (
            "fused in_proj_weight; run the model through "
            "automl_compress.attention.unfuse_attention first (load_task does) to compress "
            "its q/k/v/out projections as Linear layers"
        )
    if isinstance(module, UnfusedMultiheadAttention):
        return None  # its own parameters are bias vectors (bias_k / bias_v); projections above
    if any(p.dim() >= 2 for p in module.parameters(recurse=False)):
        return "module type not supported"
    return None


def select_layers(
    model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()
) -> tuple[dict[str, nn.Module], list[UnsupportedLayer]]:
    """The compressible layers of a model, and the weight-holding modules that are not.

    A module is selected when its name matches an ``include`` glob and no ``exclude`` glob
    (``fnmatch`` on names from ``model.named_modules()``). Among the matched modules, those that
    own a weight of two or more dimensions but are not a supported layer (LSTM, Embedding,
    ConvTranspose, a conv with a non-zero padding mode, an ``nn.MultiheadAttention`` and the
    ``out_proj`` it uses functionally, ...) are returned in ``unsupported`` rather than dropped
    silently; normalisation layers (1-D weights only) are ignored. The projections of an
    :class:`~automl_compress.attention.UnfusedMultiheadAttention` (what
    :func:`~automl_compress.attention.unfuse_attention` makes of a MultiheadAttention) are
    ordinary Linear layers and are selected.

    Returns:
        ``(layers, unsupported)``: name → module in ``named_modules`` order, and the skipped ones.
    """
    include, exclude = tuple(include), tuple(exclude)
    layers: dict[str, nn.Module] = {}
    unsupported: list[UnsupportedLayer] = []
    mha_children = _mha_children(model)
    for name, module in model.named_modules():
        if not _matches(name, include) or _matches(name, exclude):
            continue
        if isinstance(module, SUPPORTED):
            reason = _supported_reason(name, module, mha_children)
            if reason is None:
                layers[name] = module
                continue
        else:
            reason = _other_reason(module)
        if reason is not None:
            unsupported.append(UnsupportedLayer(name, type(module).__name__, reason))
    return layers, unsupported
