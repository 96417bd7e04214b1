"""What a :class:`~automl_compress.envs.CompressionEnv` decides without the agent.

What it can be given for the decisions it does not hand to the agent (docs/env.md §1.2): a callable
:data:`Policy` asked at each decision, or an allocator that decides a whole layer from the tables.
The built-in allocators are in :mod:`automl_compress.agents.policies`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from automl_compress.config import CostConfig
from automl_compress.database.tables import LayerTable

Policy = Callable[[np.ndarray, np.ndarray], int]


@dataclass(frozen=True)
class RowRequest:
    """What a :class:`RowAllocator` is asked: the widths of a layer's kept rows.

    Attributes:
        table: the layer's table.
        pattern: the layer's pattern, an index into ``table.patterns``.
        rows: the kept rows, most important first.
        budget: the bits those rows may spend (metadata included).
        option_bits: (len(table.bits),) bits of one row at each width under the pattern.
        cost: the size accounting ``option_bits`` came from.
    """

    table: LayerTable
    pattern: int
    rows: np.ndarray
    budget: float
    option_bits: np.ndarray
    cost: CostConfig


@runtime_checkable
class RowAllocator(Protocol):
    """Decides the widths of all kept rows of a layer at once, from the tables."""

    def fill_rows(self, req: RowRequest) -> np.ndarray:
        """(len(req.rows),) width indices into ``req.table.bits``, within ``req.budget``."""
        ...


@runtime_checkable
class LayerAllocator(Protocol):
    """Decides a whole layer from the tables.

    Its pattern and its rows' bit budget (no row removed).
    """

    def choose_layer(self, table: LayerTable, option_bits: np.ndarray) -> tuple[int, float]:
        """(pattern index into ``table.patterns``, bits for the layer's rows)."""
        ...
