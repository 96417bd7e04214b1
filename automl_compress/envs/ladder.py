"""The budget form's layer actions (docs/env.md §1.2).

What each ``Discrete(patterns × fractions × levels)`` action means at each layer.

Action a decodes to (pattern i, 0-bit fraction f, level k). At layer l it keeps
``n_keep = rows − floor(f·rows)`` rows under the table's pattern and grants them
``clip(n_keep · cols · s · μ_k, n_keep · c_lo, n_keep · c_hi)`` bits, s the fair share of the budget
left per undecided weight (a state of the episode, so the grant is computed per step by
:meth:`LayerLadder.budgets`), μ_0 = 0 and μ_1..μ_{levels−1} geometric from 1/4 to 2, c_lo / c_hi
the pattern's cheapest and dearest per-row cost. Everything that does not depend on the episode is
tabulated here once per model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from automl_compress.database.tables import LayerTable


@dataclass(frozen=True)
class LayerLadder:
    """Per layer and action: validity, table pattern, removed rows and kept-row data.

    The kept rows' data are their cheapest cost, dearest cost and weights; plus the level
    multipliers μ_k.

    Attributes:
        n_patterns, fractions, levels: the action grid (menu patterns × 0-bit fractions × levels).
        valid, pattern, pruned, lo, hi, weights: per layer, one (n,) array over the actions.
        level_mult: (levels,) μ_k.
    """

    n_patterns: int
    fractions: tuple[float, ...]
    levels: int
    valid: tuple[np.ndarray, ...]
    pattern: tuple[np.ndarray, ...]
    pruned: tuple[np.ndarray, ...]
    lo: tuple[np.ndarray, ...]
    hi: tuple[np.ndarray, ...]
    weights: tuple[np.ndarray, ...]
    level_mult: np.ndarray

    @property
    def n(self) -> int:
        """The number of layer actions."""
        return self.n_patterns * len(self.fractions) * self.levels

    def decode(self, a: int) -> tuple[int, int, int]:
        """(menu pattern index, fraction index, level) of action ``a``."""
        k = a % self.levels
        rest = a // self.levels
        return rest // len(self.fractions), rest % len(self.fractions), k

    def budgets(self, layer: int, fair: float) -> np.ndarray:
        """(n,) bits each action grants layer ``layer`` at a fair share of ``fair`` bits/weight."""
        mult = self.level_mult[np.arange(self.n) % self.levels]
        want = self.weights[layer] * fair * mult
        return np.clip(want, self.lo[layer], self.hi[layer])


def build_ladder(tables: Sequence[LayerTable], option_bits: Sequence[np.ndarray],
                 menu_patterns: Sequence[str], fractions: Sequence[float],
                 levels: int) -> LayerLadder:
    """Tabulate the layer actions of every layer (see the module docstring)."""
    empty = LayerLadder(len(menu_patterns), tuple(fractions), levels, (), (), (), (), (), (),
                        np.zeros(0))
    n = empty.n
    cols: dict[str, list[np.ndarray]] = {k: [] for k in
                                         ("valid", "pattern", "pruned", "lo", "hi", "weights")}
    for t, ob in zip(tables, option_bits, strict=True):
        valid, pat = np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64)
        pruned = np.zeros(n, dtype=np.int64)
        lo, hi, w = np.zeros(n), np.zeros(n), np.zeros(n)
        for a in range(n):
            pi, fi, _ = empty.decode(a)
            name = menu_patterns[pi]
            if name not in t.patterns:
                continue
            p = t.patterns.index(name)
            n_pruned = math.floor(fractions[fi] * t.info.rows)
            keep = t.info.rows - n_pruned
            valid[a], pat[a], pruned[a] = True, p, n_pruned
            lo[a], hi[a] = keep * float(ob[p].min()), keep * float(ob[p].max())
            w[a] = keep * t.info.cols
        for key, arr in zip(cols, (valid, pat, pruned, lo, hi, w), strict=True):
            cols[key].append(arr)
    k = np.arange(levels) % levels
    mult = np.where(k == 0, 0.0, 2.0 ** (3.0 * (k - 1) / max(levels - 2, 1) - 2.0))
    return LayerLadder(len(menu_patterns), tuple(fractions), levels,
                       *(tuple(cols[key]) for key in cols), level_mult=mult)
