"""The in-memory view of the layer database that allocators and environments read.

Nothing here solves anything: a :class:`LayerTable` holds, for one layer, the exact per-row error of
every option of the menu (rows × patterns × bits) and the layer's shape metadata. Row errors are
exactly additive (docs/solvers.md §1), so any per-row mixture's error is a sum of table entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from automl_compress.config import CostConfig
from automl_compress.database.costs import row_bits
from automl_compress.specs import LayerInfo

__all__ = ["LayerInfo", "LayerTable"]


@dataclass(frozen=True)
class LayerTable:
    """Exact per-row errors of every option for one layer.

    Attributes:
        info: the layer's metadata.
        bits: the menu's bit-widths, ascending (0 = row removed).
        patterns: the patterns this layer can take (N:M patterns that do not fit are absent);
            'dense' is always first.
        errors: (rows, len(patterns), len(bits)) float64; ``errors[r, p, b]`` is the exact error
            ``0.5 (w−ŵ)H(w−ŵ)ᵀ`` of row r at pattern p and bit-width bits[b]. The 0-bit column is
            the row's full output energy (the same for every pattern).
    """

    info: LayerInfo
    bits: tuple[int, ...]
    patterns: tuple[str, ...]
    errors: np.ndarray
    # option_bits by cost config: every DP step and plan count reads them
    _option_bits: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shape = (self.info.rows, len(self.patterns), len(self.bits))
        if self.errors.shape != shape:
            raise ValueError(f"errors must have shape {shape}, found {self.errors.shape}")
        if list(self.bits) != sorted(self.bits):
            raise ValueError(f"bits must be ascending, found {self.bits}")
        if not self.patterns or self.patterns[0] != "dense":
            raise ValueError(f"patterns must start with 'dense', found {self.patterns}")

    def option_bits(self, cost: CostConfig | None = None) -> np.ndarray:
        """(len(patterns), len(bits)) bits to store one row at each option, metadata included.

        Computed once per ``cost`` and returned read-only.
        """
        ob = self._option_bits.get(cost)
        if ob is None:
            ob = np.array(
                [[row_bits(self.info.cols, b, p, cost) for b in self.bits] for p in self.patterns],
                dtype=np.float64,
            )
            ob.setflags(write=False)
            self._option_bits[cost] = ob
        return ob

    def error_of(self, pattern: str, row_bits_: np.ndarray) -> float:
        """Layer error of a per-row assignment: the sum of the table entries."""
        p = self.patterns.index(pattern)
        idx = np.searchsorted(np.asarray(self.bits), np.asarray(row_bits_))
        return float(self.errors[np.arange(self.info.rows), p, idx].sum())
