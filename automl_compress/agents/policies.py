"""The non-learned policies a :class:`~automl_compress.envs.CompressionEnv` can be given.

Each decides a whole layer from the exact tables, where a learned controller would act one
decision at a time (docs/env.md §1.2):

- :class:`KnapsackChannels` (channel side): the exact per-row knapsack on the kept rows under the
  layer's budget (docs/allocation.md §2).
- :class:`UniformChannels` (channel side): one width for all kept rows, the dearest that fits.
- :class:`DPLayers` (layer side): the DP allocator's pattern and bit budget for every layer, no
  row removed (docs/allocation.md §3).

:data:`CHANNEL_POLICIES` and :data:`LAYER_POLICIES` map the config names
(``agent.channel_controller``, ``agent.layer_controller``) to them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from automl_compress.config import Config
from automl_compress.database.allocate import allocate_dp
from automl_compress.database.knapsack import (
    ENV_DP_CELLS,
    ENV_KEPT_BYTES,
    KeptTables,
    knapsack_layer,
)
from automl_compress.database.tables import LayerTable
from automl_compress.envs.episode import TOL
from automl_compress.envs.policy import LayerAllocator, RowAllocator, RowRequest


@dataclass(frozen=True)
class KnapsackChannels:
    """The exact multiple-choice knapsack over the kept rows.

    Exact DP up to ``max_cells`` rows × budget states, the convex-hull greedy above; see
    :func:`~automl_compress.database.knapsack.knapsack_layer`. The knapsack tables of each
    (layer table, pattern, kept rows) are kept (an env asks the same few row sets at many
    budgets), so a repeated request is a backtrack; the choices are those of a fresh knapsack.
    """

    max_cells: int = ENV_DP_CELLS
    # (id of the table, pattern, kept rows) -> (the table, the kept rows' table, its DP tables)
    _kept: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def fill_rows(self, req: RowRequest) -> np.ndarray:
        """The width index of every kept row: the exact knapsack's choice within the budget."""
        t = req.table
        rows = np.asarray(req.rows, dtype=np.int64)
        key = (id(t), req.pattern, rows.tobytes())
        hit = self._kept.get(key)
        if hit is None:  # the value holds the table, so its id is not reused while kept
            kept = LayerTable(dataclasses.replace(t.info, rows=len(rows)), t.bits, t.patterns,
                              t.errors[rows])
            hit = self._kept[key] = (t, kept, KeptTables(ENV_KEPT_BYTES, runs=False))
        bits = knapsack_layer(hit[1], t.patterns[req.pattern], req.budget, req.cost,
                              max_cells=self.max_cells, tables=hit[2])
        return np.searchsorted(np.asarray(t.bits), bits)


@dataclass(frozen=True)
class UniformChannels:
    """One width for every kept row: the dearest whose cost for all of them fits the budget."""

    def fill_rows(self, req: RowRequest) -> np.ndarray:
        """The width index of every kept row: the dearest one they all fit (0 when none does)."""
        ob, keep = req.option_bits, len(req.rows)
        fits = np.flatnonzero(keep * ob <= req.budget + TOL)
        return np.full(keep, int(fits[np.argmax(ob[fits])]) if len(fits) else 0)


class DPLayers:
    """The DP allocator's layer decisions at one budget.

    Per layer: its pattern and the bits the DP's plan gives its rows.

    Args:
        tables: the layer tables the env walks (forward order).
        cfg: the run config (``env.budget_bits`` and ``cost`` are read, as the env reads them).

    Raises:
        InfeasibleBudgetError: the budget is below the smallest feasible one.
    """

    def __init__(self, tables: Sequence[LayerTable], cfg: Config) -> None:
        self.plan = allocate_dp(list(tables), cfg.env.budget_bits, cfg.cost)

    def choose_layer(self, table: LayerTable, option_bits: np.ndarray) -> tuple[int, float]:
        """The DP plan's pattern index for the layer and the bits its rows take."""
        lp = self.plan.layers[table.info.name]
        p = table.patterns.index(lp.pattern)
        idx = np.searchsorted(np.asarray(table.bits), np.asarray(lp.row_bits))
        return p, float(option_bits[p, idx].sum())


CHANNEL_POLICIES: dict[str, Callable[[], RowAllocator]] = {
    "knapsack": KnapsackChannels,
    "uniform": UniformChannels,
}
LAYER_POLICIES: dict[str, Callable[[Sequence[LayerTable], Config], LayerAllocator]] = {
    "dp": DPLayers,
}
