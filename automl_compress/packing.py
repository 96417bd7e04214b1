"""The packed format of one compressed layer: bit streams, N:M index coding, a layer's tensors.

The file-level format (the header, the dense tensors, loading into a model) is
:mod:`automl_compress.export`'s; the layout is in ``docs/export.md``. Here:

- :func:`pack_bits` / :func:`unpack_bits`: unsigned integers in a little-endian bit stream at
  their bit-width.
- :func:`nm_groups`, :func:`nm_encode`, :func:`nm_decode`: an N:M keep-mask as ⌈log2 M⌉-bit
  indices per kept value, groups along input channels at one kernel tap.
- :func:`layer_tensors` / :func:`layer_weight`: one layer's tensors (row bit-widths, sparsity
  coding, codes, scales and zero points per bit-width) from its stored solutions, and the float
  weight back from them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from automl_compress.config import CostConfig
from automl_compress.database.store import LayerSolutions
from automl_compress.database.work import kernel_area
from automl_compress.errors import InvalidInputError
from automl_compress.plan import LayerPlan
from automl_compress.specs import Pattern

ROW_BITS_WIDTH = 4  # per-row bit-width (0..8) in the file, 4 bits each
ZERO_DTYPES = {8: torch.uint8, 16: torch.int16, 32: torch.int32}


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


def nm_encode(mask: np.ndarray, n: int, m: int, area: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The N:M indices of a mask: (indices, the mask they describe), or None.

    The indices are (rows, groups, N) in 0..M−1; None when a group keeps more than N. A group
    keeping fewer than N is padded with its first unkept positions (their codes are the zero point,
    so the weight stays exactly 0).
    """
    groups = nm_groups(mask.shape[1], m, area)
    g = mask[:, groups]  # (rows, G, M)
    if (g.sum(axis=2) > n).any():
        return None
    # kept positions first (stable: ascending), then the padding; take the first N
    order = np.argsort(~g, axis=2, kind="stable")[:, :, :n]
    idx = np.sort(order, axis=2)
    return idx.astype(np.uint8), nm_decode(idx, mask.shape[1], m, area)


def nm_decode(idx: np.ndarray, cols: int, m: int, area: int) -> np.ndarray:
    """The (rows, cols) keep-mask that N:M indices (rows, groups, N) describe."""
    groups = nm_groups(cols, m, area)
    rows = idx.shape[0]
    mask = np.zeros((rows, cols), dtype=bool)
    pos = groups[np.arange(groups.shape[0])[None, :, None], idx]  # (rows, G, N)
    mask[np.arange(rows)[:, None, None], pos] = True
    return mask


# ---------------------------------------------------------------------------------------------
# One layer


def _fp16_exact(scale: torch.Tensor) -> bool:
    half = scale.to(torch.float16)
    return bool(torch.isfinite(half).all()) and torch.equal(half.to(scale.dtype), scale)


def layer_tensors(
    name: str, sol: LayerSolutions, lp: LayerPlan, source: str, cost: CostConfig,
    tensors: dict[str, torch.Tensor], parts: dict[str, int],
) -> dict[str, Any]:
    """Add one layer's packed tensors to ``tensors`` (their payload bytes by kind to ``parts``).

    Args:
        name: the layer's module name (the tensors are keyed ``name/...``).
        sol: the layer's stored solutions.
        lp: the layer's plan entry.
        source: 'table' (the database's solutions) or 'rtn' (its round-to-nearest ones).
        cost: the size model (the widths of scales and zero points).
        tensors: the file's tensors, added to.
        parts: payload bytes by kind, added to.

    Returns:
        The layer's header entry (shape of its payload: rows, cols, pattern, blocks, sparsity
        coding, scale dtypes).

    Raises:
        InvalidInputError: a zero point of the database is not an integer.
    """
    info = sol.info
    rb = np.asarray(lp.row_bits, dtype=np.int64)
    kept = np.nonzero(rb > 0)[0]
    pattern = Pattern.parse(lp.pattern)
    blocks = sol.blocks.to(torch.int64).tolist()
    area = kernel_area(info) if len(blocks) == 1 else 1
    options = {b: (sol.rtn[b] if source == "rtn" else sol.options[(lp.pattern, b)])
               for b in sorted(set(lp.row_bits)) if b > 0}
    mask = None  # (rows, cols) keep-mask of the layer, sparse patterns only
    if pattern.kind != "dense":
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
    if mask is not None and pattern.n_m is not None:
        n, m = pattern.n_m
        coded = nm_encode(mask[kept], n, m, area)
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
        put(f"zero.b{b}", zero.round().to(ZERO_DTYPES[cost.zero_bits]), "zeros")
    entry["scale_dtype"] = scale_dtypes
    return entry


def layer_weight(tensors: dict[str, torch.Tensor], name: str, lm: dict[str, Any]) \
        -> torch.Tensor:
    """The (rows, cols) float32 weight of one packed layer.

    The inverse of :func:`layer_tensors`; ``lm`` is its header entry.
    """
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
        mask[kept] = nm_decode(idx.reshape(len(kept), cols // m, n), cols, m, lm["nm_area"])
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
