"""On-disk layer database: one safetensors file per layer plus a JSON manifest.

Layout of a database folder::

    manifest.json            fingerprints (model, calibration, solver, menu, capture), the planned
                             layer list, and per finished layer its file name and SHA-256
    layers/0003.safetensors  one file per finished layer, written atomically
    .build.lock              held by the one build that may write the folder (the pid inside)

A layer file holds the exact per-row error table (rows × patterns × bits), the error table of
round-to-nearest (the ``rtn`` baseline), and compact per-row solutions for every option: uint8 grid
codes, float32 scale and zero point per (row, column block), and a bit-packed keep-mask for sparse
patterns. ``scale · (code − zero) · mask`` rebuilds every stored row exactly, so any per-row mixture
of options can be stitched (:mod:`automl_compress.stitch`).

Opening a database built for another model, calibration set, solver or menu raises
:class:`DatabaseMismatchError` naming what differs. A layer file that does not match its recorded
SHA-256 or cannot be parsed raises :class:`CorruptCacheError` on read; the builder instead warns and
re-solves that layer (:mod:`automl_compress.database.build`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from automl_compress.database.tables import LayerTable
from automl_compress.errors import CorruptCacheError, DatabaseMismatchError
from automl_compress.io import atomic_write_bytes, atomic_write_json
from automl_compress.specs import LayerInfo

DB_FORMAT = 1
MANIFEST = "manifest.json"
BUILD_LOCK = ".build.lock"


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a (rows, cols) bool mask into (rows, ceil(cols/8)) uint8 (big-endian bits)."""
    arr = np.packbits(mask.cpu().numpy().astype(bool), axis=1)
    return torch.from_numpy(arr)


def unpack_mask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`."""
    arr = np.unpackbits(packed.cpu().numpy(), axis=1, count=cols).astype(bool)
    return torch.from_numpy(arr)


@dataclass(frozen=True)
class OptionSolution:
    """One option's solution for every row of a layer.

    Attributes:
        codes: (rows, cols) uint8 grid codes; pruned positions hold the zero point.
        scale: (rows, n_blocks) float32 grid steps (one per column block; usually one block).
        zero: (rows, n_blocks) float32 zero points.
        mask: (rows, cols) bool keep-mask, or None for dense.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    mask: torch.Tensor | None = None

    def weight(
        self, blocks: torch.Tensor, rows: torch.Tensor | slice = slice(None)
    ) -> torch.Tensor:
        """Dequantized weights (float32) of the selected rows."""
        codes = self.codes[rows].to(torch.float32)
        out = torch.empty_like(codes)
        for k, (a, b) in enumerate(blocks.tolist()):
            s = self.scale[rows, k].to(torch.float32)[:, None]
            z = self.zero[rows, k].to(torch.float32)[:, None]
            out[:, a:b] = s * (codes[:, a:b] - z)
        if self.mask is not None:
            out = out * self.mask[rows].to(out.dtype)
        return out


@dataclass(frozen=True)
class LayerSolutions:
    """Everything stored for one layer.

    Attributes:
        table: the exact error table.
        rtn_errors: (rows, len(bits)) errors of round-to-nearest (dense pattern).
        options: (pattern, bits) -> solution, for every bits > 0 and every table pattern.
        rtn: bits -> round-to-nearest solution (dense).
        blocks: (n_blocks, 2) int64 column ranges [start, stop) sharing one scale/zero.
    """

    table: LayerTable
    rtn_errors: np.ndarray
    options: Mapping[tuple[str, int], OptionSolution]
    rtn: Mapping[int, OptionSolution]
    blocks: torch.Tensor

    @property
    def info(self) -> LayerInfo:
        """The layer's metadata (its table's)."""
        return self.table.info


def _info_to_dict(info: LayerInfo) -> dict[str, Any]:
    d = dataclasses.asdict(info)
    d["kernel"] = list(info.kernel)
    d["stride"] = list(info.stride)
    return d


def info_from_dict(d: Mapping[str, Any]) -> LayerInfo:
    """Inverse of the manifest's layer ``info`` entry."""
    d = dict(d)
    d["kernel"] = tuple(d.get("kernel", ()))
    d["stride"] = tuple(d.get("stride", ()))
    return LayerInfo(**d)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_layer(sol: LayerSolutions) -> bytes:
    """Serialise one layer to safetensors bytes."""
    t = sol.table
    tensors: dict[str, torch.Tensor] = {
        "errors": torch.from_numpy(np.ascontiguousarray(t.errors, dtype=np.float64)),
        "rtn_errors": torch.from_numpy(np.ascontiguousarray(sol.rtn_errors, dtype=np.float64)),
        "blocks": sol.blocks.to(torch.int64).contiguous(),
    }

    def put(prefix: str, o: OptionSolution) -> None:
        tensors[f"{prefix}/codes"] = o.codes.to(torch.uint8).contiguous()
        tensors[f"{prefix}/scale"] = o.scale.to(torch.float32).contiguous()
        tensors[f"{prefix}/zero"] = o.zero.to(torch.float32).contiguous()
        if o.mask is not None:
            tensors[f"{prefix}/mask"] = pack_mask(o.mask).contiguous()

    for (p, b), o in sol.options.items():
        put(f"q/{t.patterns.index(p)}/{b}", o)
    for b, o in sol.rtn.items():
        put(f"rtn/{b}", o)
    meta = {
        "format": str(DB_FORMAT),
        "info": json.dumps(_info_to_dict(t.info)),
        "bits": json.dumps(list(t.bits)),
        "patterns": json.dumps(list(t.patterns)),
    }
    return st_save(tensors, metadata=meta)


def decode_layer(data: bytes) -> LayerSolutions:
    """Parse bytes written by :func:`encode_layer`."""
    tensors = st_load(data)
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + header_len].decode("utf-8")).get("__metadata__", {})
    info = info_from_dict(json.loads(meta["info"]))
    bits = tuple(int(b) for b in json.loads(meta["bits"]))
    patterns = tuple(json.loads(meta["patterns"]))
    table = LayerTable(info, bits, patterns, tensors["errors"].numpy().astype(np.float64))

    def get(prefix: str) -> OptionSolution:
        mask = tensors.get(f"{prefix}/mask")
        return OptionSolution(
            codes=tensors[f"{prefix}/codes"],
            scale=tensors[f"{prefix}/scale"],
            zero=tensors[f"{prefix}/zero"],
            mask=None if mask is None else unpack_mask(mask, info.cols),
        )

    options = {
        (p, b): get(f"q/{pi}/{b}") for pi, p in enumerate(patterns) for b in bits if b > 0
    }
    rtn = {b: get(f"rtn/{b}") for b in bits if b > 0}
    return LayerSolutions(table, tensors["rtn_errors"].numpy(), options, rtn, tensors["blocks"])


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 80 else s[:77] + "..."


def describe_mismatch(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """Human-readable list of the fingerprint entries that differ."""
    out = []
    for key in sorted(set(expected) | set(found)):
        if expected.get(key) != found.get(key):
            out.append(f"{key}: database has {_short(found.get(key))}, "
                       f"this run needs {_short(expected.get(key))}")
    return out


class LayerDatabase:
    """A database folder: read finished layers, write new ones atomically.

    Use :meth:`open` for an existing, complete or partial database and :meth:`create_or_resume`
    when building. Layer objects are cached after the first read.
    """

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = Path(root)
        self._manifest = manifest
        self._cache: dict[str, LayerSolutions] = {}

    # -- opening ---------------------------------------------------------------------------

    @staticmethod
    def _read_manifest(root: Path) -> dict[str, Any] | None:
        path = Path(root) / MANIFEST
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("format") != DB_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {DB_FORMAT}")
            return data
        except (OSError, ValueError) as exc:
            raise CorruptCacheError(
                f"database manifest {str(path)!r} cannot be read ({exc}); delete the folder "
                f"{str(root)!r} and run build-db again"
            ) from None

    @classmethod
    def open(cls, root: str | Path, fingerprints: Mapping[str, Any] | None = None):
        """Open an existing database, checking its fingerprints when given.

        Raises:
            CorruptCacheError: no readable manifest.
            DatabaseMismatchError: the fingerprints differ (the message lists each difference).
        """
        root = Path(root)
        manifest = cls._read_manifest(root)
        if manifest is None:
            raise CorruptCacheError(
                f"no layer database at {str(root)!r} (missing {MANIFEST}); run "
                "`automl-compress build-db` first"
            )
        if fingerprints is not None:
            cls._check(root, manifest, fingerprints)
        return cls(root, manifest)

    @staticmethod
    def _check(root: Path, manifest: Mapping[str, Any], fingerprints: Mapping[str, Any]) -> None:
        diffs = describe_mismatch(dict(fingerprints), manifest.get("fingerprints", {}))
        if diffs:
            raise DatabaseMismatchError(
                f"the layer database at {str(root)!r} was built for a different setup: "
                + "; ".join(diffs)
                + ". Use another --out folder, or delete that database to rebuild it.",
                tuple(diffs),
            )

    @classmethod
    def create_or_resume(cls, root: str | Path, fingerprints: Mapping[str, Any]):
        """Open a matching (possibly partial) database, or start an empty one."""
        root = Path(root)
        manifest = cls._read_manifest(root)
        if manifest is not None:
            cls._check(root, manifest, fingerprints)
            return cls(root, manifest)
        manifest = {"format": DB_FORMAT, "fingerprints": dict(fingerprints), "order": [],
                    "layers": {}, "complete": False}
        atomic_write_json(root / MANIFEST, manifest)
        return cls(root, manifest)

    # -- manifest --------------------------------------------------------------------------

    @property
    def fingerprints(self) -> dict[str, Any]:
        """The setup fingerprints recorded in the manifest."""
        return dict(self._manifest["fingerprints"])

    @property
    def order(self) -> list[LayerInfo]:
        """Every layer the database covers, in forward order (set by the builder)."""
        return [info_from_dict(d) for d in self._manifest["order"]]

    @property
    def complete(self) -> bool:
        """Whether the build finished and every layer of the order has been written."""
        return bool(self._manifest.get("complete")) and all(
            i.name in self._manifest["layers"] for i in self.order
        )

    def set_order(self, infos: list[LayerInfo]) -> None:
        """Record the layers the database covers, in forward order, in the manifest."""
        self._manifest["order"] = [_info_to_dict(i) for i in infos]
        atomic_write_json(self.root / MANIFEST, self._manifest)

    def mark_complete(self) -> None:
        """Record in the manifest that the build finished."""
        self._manifest["complete"] = True
        atomic_write_json(self.root / MANIFEST, self._manifest)

    def finished(self) -> list[str]:
        """Names of the layers with a recorded file."""
        return list(self._manifest["layers"])

    # -- layers ----------------------------------------------------------------------------

    def _file(self, name: str) -> Path:
        return self.root / self._manifest["layers"][name]["file"]

    def write_layer(self, sol: LayerSolutions) -> None:
        """Write one layer atomically, then record it in the manifest (atomically too)."""
        name = sol.info.name
        data = encode_layer(sol)
        rel = f"layers/{sol.info.index:04d}.safetensors"
        atomic_write_bytes(self.root / rel, data)
        self._manifest["layers"][name] = {"file": rel, "sha256": _sha256(data)}
        atomic_write_json(self.root / MANIFEST, self._manifest)
        self._cache[name] = sol

    def verify_layer(self, name: str) -> str | None:
        """None if the layer's file matches its checksum and parses, else the reason."""
        entry = self._manifest["layers"].get(name)
        if entry is None:
            return "not built"
        try:
            data = self._file(name).read_bytes()
        except OSError as exc:
            return f"unreadable ({exc})"
        if _sha256(data) != entry["sha256"]:
            return "checksum mismatch"
        try:
            decode_layer(data)
        except Exception as exc:  # noqa: BLE001  (any parse failure means a corrupt file)
            return f"cannot be parsed ({exc})"
        return None

    def forget_layer(self, name: str) -> None:
        """Drop a layer's record (the builder re-solves it)."""
        self._manifest["layers"].pop(name, None)
        self._cache.pop(name, None)
        atomic_write_json(self.root / MANIFEST, self._manifest)

    def layer(self, name: str) -> LayerSolutions:
        """The stored layer (cached).

        Raises:
            CorruptCacheError: missing, checksum mismatch or unparsable file.
        """
        if name in self._cache:
            return self._cache[name]
        if name not in self._manifest["layers"]:
            raise CorruptCacheError(
                f"layer {name!r} is not in the database at {str(self.root)!r}; finished layers: "
                f"{self.finished()[:10]}; run build-db to finish it"
            )
        problem = self.verify_layer(name)
        if problem is not None:
            raise CorruptCacheError(
                f"layer file {str(self._file(name))!r} of {name!r} is corrupt: {problem}; run "
                "build-db again (it re-solves corrupt layers) or delete the database folder"
            )
        sol = decode_layer(self._file(name).read_bytes())
        self._cache[name] = sol
        return sol

    def table(self, name: str) -> LayerTable:
        """The error table of layer ``name``."""
        return self.layer(name).table

    def tables(self) -> list[LayerTable]:
        """Every layer's table in forward order."""
        return [self.table(i.name) for i in self.order]
