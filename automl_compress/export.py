"""Export a compressed model to one safetensors file, and load it back as a float model.

File layout (``compressed.safetensors``):

- per compressed layer ``L`` and each bit-width ``b`` used by its rows:
  ``L/rows.b{b}`` (int32 row indices), ``L/codes.b{b}`` (the kept values' grid codes, bit-packed at
  ``b`` bits each, row-major, positions given by the mask), ``L/scale.b{b}`` (float32, one per row
  and column block) and ``L/zero.b{b}`` (uint8);
- ``L/mask`` (bit-packed keep-mask, sparse patterns only) and ``L/blocks`` (column blocks);
- ``dense/<key>`` every other state-dict entry as stored by the model (biases after bias
  correction, re-estimated BatchNorm statistics, layers left dense);
- metadata: ``format``, ``plan`` (the plan JSON) and ``layers`` (shape and pattern per layer).

:func:`load_compressed` rebuilds the float model from that file alone plus the architecture (a
factory or a Task), and gives the same outputs as the stitched, corrected model it came from.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from automl_compress.database.store import LayerDatabase, pack_mask, unpack_mask
from automl_compress.errors import CorruptCacheError, InvalidInputError
from automl_compress.io import atomic_write_bytes
from automl_compress.plan import CompressionPlan
from automl_compress.stitch import plan_source, set_weight
from automl_compress.zoo.base import Task

EXPORT_FORMAT = "automl-compress/1"


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers < 2**bits into a little-endian bit stream of ``bits`` each."""
    raw = np.asarray(values).reshape(-1)
    if raw.size and (int(raw.max()) >= 2**bits or int(raw.min()) < 0):
        raise InvalidInputError(
            f"values must be in [0, 2**{bits}) = [0, {2**bits}), found [{int(raw.min())}, "
            f"{int(raw.max())}]"
        )
    v = raw.astype(np.uint8)
    planes = (v[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1).astype(np.uint8), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` for ``n`` values."""
    flat = np.unpackbits(np.asarray(packed, dtype=np.uint8), count=n * bits, bitorder="little")
    planes = flat.reshape(n, bits).astype(np.uint16) << np.arange(bits, dtype=np.uint16)
    return planes.sum(axis=1).astype(np.uint8)


def export_compressed(
    path: str | Path, model: nn.Module, db: LayerDatabase, plan: CompressionPlan,
    source: str | None = None,
) -> dict[str, int]:
    """Write ``model`` (a stitched, corrected model of ``plan``) as packed integers + plan.

    Args:
        path: output file (written atomically).
        model: the stitched model; its non-compressed tensors (biases, BN, dense layers) are saved
            as they are.
        db: the layer database the plan was stitched from.
        plan: the plan.
        source: 'table' or 'rtn'; default from the plan.

    Returns:
        ``{"file_bytes": ..., "packed_weight_bytes": ...}``.
    """
    source = source or plan_source(plan)
    tensors: dict[str, torch.Tensor] = {}
    layers_meta = {}
    packed_bytes = 0
    modules = dict(model.named_modules())
    for name, lp in plan.layers.items():
        sol = db.layer(name)
        info = sol.info
        rb = np.asarray(lp.row_bits)
        mask = None
        for b in sorted(set(lp.row_bits)):
            if b == 0:
                continue
            opt = sol.rtn[b] if source == "rtn" else sol.options[(lp.pattern, b)]
            rows = np.nonzero(rb == b)[0]
            codes = opt.codes[rows].numpy()
            if opt.mask is not None:
                if mask is None:
                    mask = torch.zeros(info.rows, info.cols, dtype=torch.bool)
                m = opt.mask[rows]
                mask[rows] = m
                values = codes[m.numpy()]
            else:
                values = codes.reshape(-1)
            packed = pack_bits(values, b)
            packed_bytes += packed.nbytes
            tensors[f"{name}/rows.b{b}"] = torch.from_numpy(rows.astype(np.int32))
            tensors[f"{name}/codes.b{b}"] = torch.from_numpy(packed)
            tensors[f"{name}/scale.b{b}"] = opt.scale[rows].to(torch.float32).contiguous()
            tensors[f"{name}/zero.b{b}"] = opt.zero[rows].round().to(torch.uint8).contiguous()
        if mask is not None:
            tensors[f"{name}/mask"] = pack_mask(mask)
        tensors[f"{name}/blocks"] = sol.blocks.to(torch.int64).contiguous()
        layers_meta[name] = {
            "rows": info.rows, "cols": info.cols, "pattern": lp.pattern,
            "shape": list(modules[name].weight.shape), "sparse": mask is not None,
        }
    skip = {f"{n}.weight" for n in plan.layers}
    for key, t in model.state_dict().items():
        if key not in skip:
            tensors[f"dense/{key}"] = t.detach().cpu().contiguous()
    meta = {
        "format": EXPORT_FORMAT,
        "plan": json.dumps(plan.to_dict()),
        "layers": json.dumps(layers_meta),
    }
    data = st_save(tensors, metadata=meta)
    atomic_write_bytes(path, data)
    return {"file_bytes": len(data), "packed_weight_bytes": int(packed_bytes)}


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
            f"{str(path)!r} has format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}"
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
        The model in eval mode, with dequantized weights.

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
        rows, cols = lm["rows"], lm["cols"]
        blocks = tensors[f"{name}/blocks"].tolist()
        mask = unpack_mask(tensors[f"{name}/mask"], cols) if lm["sparse"] else None
        W = torch.zeros(rows, cols, dtype=torch.float32)
        prefix = f"{name}/rows.b"
        for key in [k for k in tensors if k.startswith(prefix)]:
            b = int(key[len(prefix):])
            idx = tensors[key].to(torch.int64)
            m = mask[idx] if mask is not None else torch.ones(len(idx), cols, dtype=torch.bool)
            vals = unpack_bits(tensors[f"{name}/codes.b{b}"].numpy(), b, int(m.sum()))
            zero = tensors[f"{name}/zero.b{b}"].to(torch.float32)
            codes = zero[:, :1].expand(len(idx), cols).clone()
            for k, (a, e) in enumerate(blocks):
                codes[:, a:e] = zero[:, k : k + 1]
            codes[m] = torch.from_numpy(vals.astype(np.float32))
            scale = tensors[f"{name}/scale.b{b}"].to(torch.float32)
            Wr = torch.empty_like(codes)
            for k, (a, e) in enumerate(blocks):
                Wr[:, a:e] = scale[:, k : k + 1] * (codes[:, a:e] - zero[:, k : k + 1])
            if mask is not None:
                Wr = Wr * m.to(Wr.dtype)
            W[idx] = Wr
        set_weight(modules[name], W)
    return model.eval()
