"""CompressionPlan: per layer, a sparsity pattern and one bit-width per output row."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from automl_compress.config import parse_pattern
from automl_compress.errors import CorruptCacheError, InvalidInputError
from automl_compress.io import atomic_write_json

PLAN_VERSION = 1


@dataclass(frozen=True)
class LayerPlan:
    """One layer's decision.

    Attributes:
        pattern: the layer's sparsity pattern ('dense', 'N:M' or 'P%').
        row_bits: one bit-width per output row (0 = the row is removed).
    """

    pattern: str
    row_bits: tuple[int, ...]

    def __post_init__(self) -> None:
        parse_pattern(self.pattern)
        for b in self.row_bits:
            if not (b == 0 or 2 <= int(b) <= 8):
                raise InvalidInputError(f"row bit-widths must be 0 or 2..8, found {b}")


@dataclass(frozen=True)
class CompressionPlan:
    """A whole-model plan keyed by module name.

    Attributes:
        layers: module name -> LayerPlan.
        meta: free-form provenance (method, budget, seed, ...), JSON-serialisable.
    """

    layers: Mapping[str, LayerPlan]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def key(self) -> tuple:
        """A hashable identity of the plan's decisions (its meta is not part of it)."""
        return tuple((n, lp.pattern, lp.row_bits) for n, lp in sorted(self.layers.items()))

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (versioned)."""
        return {
            "version": PLAN_VERSION,
            "meta": dict(self.meta),
            "layers": {
                name: {"pattern": lp.pattern, "row_bits": list(lp.row_bits)}
                for name, lp in self.layers.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionPlan:
        """The plan from :meth:`to_dict`'s data."""
        if data.get("version") != PLAN_VERSION:
            raise CorruptCacheError(
                f"plan version must be {PLAN_VERSION}, found {data.get('version')!r}"
            )
        layers = {
            name: LayerPlan(str(v["pattern"]), tuple(int(b) for b in v["row_bits"]))
            for name, v in data["layers"].items()
        }
        return cls(layers=layers, meta=dict(data.get("meta", {})))

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON, atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> CompressionPlan:
        """Read a plan written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text())
            return cls.from_dict(data)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CorruptCacheError(
                f"could not read a plan from {str(path)!r} ({exc}); expected the plan.json "
                "written by automl-compress"
            ) from None
