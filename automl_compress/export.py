"""Export a compressed model: packed integers in one safetensors file, or a float state dict.

Two formats (``automl-compress export RUN --format {packed,state_dict}``):

- ``packed`` (:func:`export_compressed`, ``RUN/compressed.safetensors``): what a deployment
  stores, laid out so that the file's payload is what the size model (``database/costs.py``)
  counts: codes bit-packed at their bit-width (kept values only), one scale and one zero point per
  kept row and column block at the counted widths, a 1-bit mask per weight of kept rows for
  unstructured sparsity, ⌈log2 M⌉-bit indices per kept value for N:M, nothing for removed rows,
  every other tensor of the state dict as the model holds it. Layout in ``docs/export.md``.
- ``state_dict`` (:func:`export_state_dict`, ``RUN/state_dict.pt``): the dequantised float
  ``state_dict()`` of the user's own module classes (attention fused back into
  ``nn.MultiheadAttention``), loadable with ``model.load_state_dict(torch.load(path,
  weights_only=True))`` into a fresh instance of the user's model, without this package.

:func:`load_compressed` rebuilds the float model from a packed file plus the architecture (a
factory, a Task or a module) and gives the outputs of the stitched, corrected model it came from.

This module holds the file: its header (format, plan, per-layer entries), the state dict's other
tensors, and the mapping between the user's fused ``nn.MultiheadAttention`` and the unfused
projections the file stores; one layer's packed tensors are :mod:`automl_compress.packing`'s.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from automl_compress.attention import fuse_attention, unfuse_attention
from automl_compress.config import CostConfig
from automl_compress.database.store import LayerDatabase
from automl_compress.errors import CorruptCacheError, InvalidInputError
from automl_compress.io import atomic_write_bytes
from automl_compress.packing import ZERO_DTYPES, layer_tensors, layer_weight
from automl_compress.plan import CompressionPlan
from automl_compress.specs import Task
from automl_compress.stitch import plan_source, set_weight

__all__ = [
    "EXPORT_FORMAT",
    "export_compressed",
    "export_state_dict",
    "load_compressed",
    "read_plan",
]

EXPORT_FORMAT = "automl-compress/2"


# ---------------------------------------------------------------------------------------------
# Writing


def _check_cost(cost: CostConfig) -> None:
    if cost.scale_bits not in (16, 32) or cost.zero_bits not in ZERO_DTYPES:
        raise InvalidInputError(
            f"export stores scales at 16 or 32 bits and zero points at 8, 16 or 32 bits; the "
            f"cost model has cost.scale_bits={cost.scale_bits}, cost.zero_bits="
            f"{cost.zero_bits}: set them to supported widths"
        )


def export_compressed(
    path: str | Path, model: nn.Module, db: LayerDatabase, plan: CompressionPlan,
    source: str | None = None, cost: CostConfig | None = None,
) -> dict[str, Any]:
    """Write ``model`` (a stitched, corrected model of ``plan``) as packed integers + plan.

    Args:
        path: output file (written atomically).
        model: the stitched model; its non-compressed tensors (biases, BN, dense layers) are saved
            as they are.
        db: the layer database the plan was stitched from.
        plan: the plan.
        source: 'table' or 'rtn'; default from the plan.
        cost: the size model whose widths the scales and zero points are stored at (default
            :class:`CostConfig`). A scale is stored at 16 bits only when it is a float16 value;
            the solvers' float32 scales are stored at 32 bits (the sizes say so).

    Returns:
        ``file_bytes`` (= ``header_bytes`` + ``payload_bytes``), ``header_bytes`` (the 8-byte
        length and the JSON header: tensor index, plan, layer shapes), ``payload_bytes``,
        ``packed_weight_bytes`` (the codes) and ``parts``: payload bytes by kind (``codes``,
        ``scales``, ``zeros``, ``sparsity``, ``row_bits``, ``params`` — the state dict's other
        parameters, ``buffers`` — e.g. BatchNorm running statistics).
    """
    cost = cost or CostConfig()
    _check_cost(cost)
    source = source or plan_source(plan)
    tensors: dict[str, torch.Tensor] = {}
    parts: dict[str, int] = {}
    layers_meta = {}
    modules = dict(model.named_modules())
    for name, lp in plan.layers.items():
        if name not in modules:
            raise InvalidInputError(
                f"plan names layer {name!r}, which the model does not have; export the model "
                "the plan was stitched on"
            )
        entry = layer_tensors(name, db.layer(name), lp, source, cost, tensors, parts)
        entry["shape"] = list(modules[name].weight.shape)
        layers_meta[name] = entry
    skip = {f"{n}.weight" for n in plan.layers}
    param_keys = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        if key in skip:
            continue
        t = t.detach().cpu().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:  # tied: safetensors wants copies
            t = t.clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        tensors[f"dense/{key}"] = t
        part = "params" if key in param_keys else "buffers"
        parts[part] = parts.get(part, 0) + t.numel() * t.element_size()
    meta = {
        "format": EXPORT_FORMAT,
        "plan": json.dumps(plan.to_dict()),
        "layers": json.dumps(layers_meta),
        "zero_dtype": str(ZERO_DTYPES[cost.zero_bits]).removeprefix("torch."),
    }
    data = st_save(tensors, metadata=meta)
    atomic_write_bytes(path, data)
    header = 8 + int.from_bytes(data[:8], "little")
    return {
        "file_bytes": len(data), "header_bytes": header, "payload_bytes": len(data) - header,
        "packed_weight_bytes": parts.get("codes", 0), "parts": parts,
    }


def export_state_dict(path: str | Path, model: nn.Module) -> int:
    """Write the float state dict of ``model`` in the user's own module classes (atomically).

    Attention unfused by :func:`~automl_compress.attention.unfuse_attention` is fused back, so
    the keys are those of a fresh instance of the user's model: load it with
    ``model.load_state_dict(torch.load(path, weights_only=True))``.

    Returns:
        The file size in bytes.
    """
    state = {k: v.detach().cpu() for k, v in fuse_attention(model).state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return len(data)


# ---------------------------------------------------------------------------------------------
# Reading


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        data = path.read_bytes()
        tensors = st_load(data)
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + n].decode("utf-8")).get("__metadata__", {})
    except Exception as exc:  # noqa: BLE001  (safetensors raises its own error types)
        raise CorruptCacheError(
            f"cannot read compressed model {str(path)!r} ({exc}); expected a file written by "
            "`automl-compress export`"
        ) from None
    if meta.get("format") != EXPORT_FORMAT:
        raise CorruptCacheError(
            f"{str(path)!r} has format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}; "
            "run `automl-compress export` again on its run directory"
        )
    return tensors, meta


def read_plan(path: str | Path) -> CompressionPlan:
    """The plan stored in an exported file."""
    _, meta = _read(Path(path))
    return CompressionPlan.from_dict(json.loads(meta["plan"]))


def load_compressed(
    path: str | Path, model_factory: Callable[[], nn.Module] | Task | nn.Module
) -> nn.Module:
    """Rebuild a float model from an exported file.

    Args:
        path: the ``compressed.safetensors`` file.
        model_factory: the architecture: a zero-argument factory, a Task (its model is copied) or a
            module (copied). Its weights are all replaced.

    Returns:
        The model in eval mode, with dequantized weights, in the user's own module classes
        (``nn.MultiheadAttention`` with a fused ``in_proj_weight``).

    Raises:
        CorruptCacheError: unreadable file or wrong format.
        InvalidInputError: the architecture does not match the file.
    """
    tensors, meta = _read(Path(path))
    if isinstance(model_factory, Task):
        model = copy.deepcopy(model_factory.model)
    elif isinstance(model_factory, nn.Module):
        model = copy.deepcopy(model_factory)
    else:
        model = model_factory()
    model = unfuse_attention(model)  # the file holds the projections as Linear layers
    layers = json.loads(meta["layers"])
    dense = {k[len("dense/"):]: v for k, v in tensors.items() if k.startswith("dense/")}
    hint = "; pass the architecture the file was exported from"
    try:
        missing, unexpected = model.load_state_dict(dense, strict=False)
    except RuntimeError as exc:
        raise InvalidInputError(
            f"the model does not match {str(path)!r}: {str(exc).splitlines()[1:3]}{hint}"
        ) from None
    expected_missing = {f"{n}.weight" for n in layers}
    if unexpected or set(missing) != expected_missing:
        raise InvalidInputError(
            f"the model does not match {str(path)!r}: unexpected keys {list(unexpected)[:5]}, "
            f"missing keys {sorted(set(missing) - expected_missing)[:5]}{hint}"
        )
    modules = dict(model.named_modules())
    for name, lm in layers.items():
        shape = list(modules[name].weight.shape) if name in modules else None
        if shape != lm["shape"]:
            raise InvalidInputError(
                f"the model does not match {str(path)!r}: layer {name!r} weight shape is {shape},"
                f" the file has {lm['shape']}{hint}"
            )
    for name, lm in layers.items():
        set_weight(modules[name], layer_weight(tensors, name, lm))
    return fuse_attention(model).eval()
