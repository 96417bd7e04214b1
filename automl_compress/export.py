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
"""

from __future__ import annotations

import copy
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from automl_compress.attention import fuse_attention, unfuse_attention
from automl_compress.config import CostConfig, parse_pattern
from automl_compress.database.build import kernel_area
from automl_compress.database.store import LayerDatabase, LayerSolutions
from automl_compress.errors import CorruptCacheError, InvalidInputError
from automl_compress.io import atomic_write_bytes
from automl_compress.plan import CompressionPlan, LayerPlan
from automl_compress.stitch import plan_source, set_weight
from automl_compress.zoo.base import Task

__all__ = [
    "EXPORT_FORMAT",
    "export_compressed",
    "export_state_dict",
    "load_compressed",
    "pack_bits",
    "read_plan",
    "unpack_bits",
]

EXPORT_FORMAT = "automl-compress/2"
ROW_BITS_WIDTH = 4  # per-row bit-width (0..8) in the file, 4 bits each
_ZERO_DTYPES = {8: torch.uint8, 16: torch.int16, 32: torch.int32}


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers < 2**bits into a little-endian bit stream of ``bits`` each.

    Value i occupies stream bits ``i·bits ... i·bits + bits − 1`` (least significant first);
    stream bit j is bit ``j % 8`` of byte ``j // 8``. ``ceil(n·bits / 8)`` bytes.
    """
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


# ---------------------------------------------------------------------------------------------
# N:M index coding


def nm_groups(cols: int, m: int, area: int) -> np.ndarray:
    """(cols / M, M) column indices of the N:M groups of a row.

    Groups run along input channels at one kernel tap: columns ordered (C_in, kh, kw) are read
    in (kh, kw, C_in) order (``area = kh·kw``; 1 for Linear layers and block-diagonal layers,
    whose groups are consecutive columns), and every M consecutive ones form a group.
    """
    perm = np.arange(cols).reshape(cols // area, area).T.reshape(-1)
    return perm.reshape(-1, m)


def _nm_encode(mask: np.ndarray, n: int, m: int, area: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(indices (rows, groups, N) in 0..M−1, the mask they describe) or None when a group keeps
    more than N. A group keeping fewer than N is padded with its first unkept positions (their
    codes are the zero point, so the weight stays exactly 0)."""
    groups = nm_groups(mask.shape[1], m, area)
    g = mask[:, groups]  # (rows, G, M)
    if (g.sum(axis=2) > n).any():
        return None
    # kept positions first (stable: ascending), then the padding; take the first N
    order = np.argsort(~g, axis=2, kind="stable")[:, :, :n]
    idx = np.sort(order, axis=2)
    return idx.astype(np.uint8), _nm_decode(idx, mask.shape[1], m, area)


def _nm_decode(idx: np.ndarray, cols: int, m: int, area: int) -> np.ndarray:
    groups = nm_groups(cols, m, area)
    rows = idx.shape[0]
    mask = np.zeros((rows, cols), dtype=bool)
    pos = groups[np.arange(groups.shape[0])[None, :, None], idx]  # (rows, G, N)
    mask[np.arange(rows)[:, None, None], pos] = True
    return mask


# ---------------------------------------------------------------------------------------------
# Writing


def _fp16_exact(scale: torch.Tensor) -> bool:
    half = scale.to(torch.float16)
    return bool(torch.isfinite(half).all()) and torch.equal(half.to(scale.dtype), scale)


def _check_cost(cost: CostConfig) -> None:
    if cost.scale_bits not in (16, 32) or cost.zero_bits not in _ZERO_DTYPES:
        raise InvalidInputError(
            f"export stores scales at 16 or 32 bits and zero points at 8, 16 or 32 bits; the "
            f"cost model has cost.scale_bits={cost.scale_bits}, cost.zero_bits="
            f"{cost.zero_bits}: set them to supported widths"
        )


def _layer_tensors(
    name: str, sol: LayerSolutions, lp: LayerPlan, source: str, cost: CostConfig,
    tensors: dict[str, torch.Tensor], parts: dict[str, int],
) -> dict[str, Any]:
    """Add one layer's tensors; return its header entry."""
    info = sol.info
    rb = np.asarray(lp.row_bits, dtype=np.int64)
    kept = np.nonzero(rb > 0)[0]
    kind, arg = parse_pattern(lp.pattern)
    blocks = sol.blocks.to(torch.int64).tolist()
    area = kernel_area(info) if len(blocks) == 1 else 1
    options = {b: (sol.rtn[b] if source == "rtn" else sol.options[(lp.pattern, b)])
               for b in sorted(set(lp.row_bits)) if b > 0}
    mask = None  # (rows, cols) keep-mask of the layer, sparse patterns only
    if kind != "dense":
        mask = np.zeros((info.rows, info.cols), dtype=bool)
        for b, opt in options.items():
            rows = np.nonzero(rb == b)[0]
            mask[rows] = opt.mask[rows].numpy()
    entry: dict[str, Any] = {
        "rows": info.rows, "cols": info.cols, "pattern": lp.pattern, "blocks": blocks,
        "sparsity": "none",
    }

    def put(key: str, t: torch.Tensor, part: str) -> None:
        tensors[f"{name}/{key}"] = t.contiguous()
        parts[part] = parts.get(part, 0) + t.numel() * t.element_size()

    put("row_bits", torch.from_numpy(pack_bits(rb, ROW_BITS_WIDTH)), "row_bits")
    if mask is not None and kind == "nm":
        n, m = arg  # type: ignore[misc]
        coded = _nm_encode(mask[kept], n, m, area)
        if coded is not None:
            idx, full = coded
            mask[kept] = full
            width = math.ceil(math.log2(m))
            put("nm_index", torch.from_numpy(pack_bits(idx, width)), "sparsity")
            entry.update(sparsity="nm", nm=[n, m], nm_area=area)
    if mask is not None and entry["sparsity"] == "none":
        put("mask", torch.from_numpy(pack_bits(mask[kept].astype(np.uint8), 1)), "sparsity")
        entry["sparsity"] = "mask"
    scale_dtypes = {}
    for b, opt in options.items():
        rows = np.nonzero(rb == b)[0]
        codes = opt.codes[rows].numpy()
        values = codes[mask[rows]] if mask is not None else codes.reshape(-1)
        put(f"codes.b{b}", torch.from_numpy(pack_bits(values, b)), "codes")
        scale = opt.scale[rows].to(torch.float32)
        if cost.scale_bits == 16 and _fp16_exact(scale):
            scale = scale.to(torch.float16)
        scale_dtypes[str(b)] = str(scale.dtype).removeprefix("torch.")
        put(f"scale.b{b}", scale, "scales")
        zero = opt.zero[rows]
        if not torch.equal(zero, zero.round()):
            raise InvalidInputError(
                f"layer {name!r}: the database's zero points at {b} bits are not integers; "
                "expected integral grid zero points (rebuild the database)"
            )
        put(f"zero.b{b}", zero.round().to(_ZERO_DTYPES[cost.zero_bits]), "zeros")
    entry["scale_dtype"] = scale_dtypes
    return entry


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
        entry = _layer_tensors(name, db.layer(name), lp, source, cost, tensors, parts)
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
        "zero_dtype": str(_ZERO_DTYPES[cost.zero_bits]).removeprefix("torch."),
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


def _layer_weight(tensors: dict[str, torch.Tensor], name: str, lm: dict[str, Any]) \
        -> torch.Tensor:
    """The (rows, cols) float32 weight of one packed layer."""
    rows, cols = lm["rows"], lm["cols"]
    rb = unpack_bits(tensors[f"{name}/row_bits"].numpy(), ROW_BITS_WIDTH, rows).astype(np.int64)
    kept = np.nonzero(rb > 0)[0]
    mask = None
    if lm["sparsity"] == "mask":
        flat = unpack_bits(tensors[f"{name}/mask"].numpy(), 1, len(kept) * cols)
        mask = np.zeros((rows, cols), dtype=bool)
        mask[kept] = flat.reshape(len(kept), cols).astype(bool)
    elif lm["sparsity"] == "nm":
        n, m = lm["nm"]
        width = math.ceil(math.log2(m))
        count = len(kept) * (cols // m) * n
        idx = unpack_bits(tensors[f"{name}/nm_index"].numpy(), width, count)
        mask = np.zeros((rows, cols), dtype=bool)
        mask[kept] = _nm_decode(idx.reshape(len(kept), cols // m, n), cols, m, lm["nm_area"])
    W = torch.zeros(rows, cols, dtype=torch.float32)
    for b in sorted({int(v) for v in rb[kept]}):
        sel = np.nonzero(rb == b)[0]
        m_b = mask[sel] if mask is not None else np.ones((len(sel), cols), dtype=bool)
        vals = unpack_bits(tensors[f"{name}/codes.b{b}"].numpy(), b, int(m_b.sum()))
        scale = tensors[f"{name}/scale.b{b}"].to(torch.float32)
        zero = tensors[f"{name}/zero.b{b}"].to(torch.float32)
        codes = torch.empty(len(sel), cols, dtype=torch.float32)
        for k, (a, e) in enumerate(lm["blocks"]):
            codes[:, a:e] = zero[:, k : k + 1]
        codes[torch.from_numpy(m_b)] = torch.from_numpy(vals.astype(np.float32))
        Wr = torch.empty_like(codes)
        for k, (a, e) in enumerate(lm["blocks"]):
            Wr[:, a:e] = scale[:, k : k + 1] * (codes[:, a:e] - zero[:, k : k + 1])
        if mask is not None:
            Wr = Wr * torch.from_numpy(m_b).to(Wr.dtype)
        W[torch.from_numpy(sel)] = Wr
    return W


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
        set_weight(modules[name], _layer_weight(tensors, name, lm))
    return fuse_attention(model).eval()
