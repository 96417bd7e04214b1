"""Episode bookkeeping of the budget-form environment (:mod:`automl_compress.envs.compression_env`).

- :class:`EpisodeSummary`: what a finished episode produced (every environment's episode hook
  receives one).
- :class:`LayerState`: the layer being decided: its pattern and budget, its kept rows in
  importance groups, the widths given so far; the budget rule of the group decisions and the
  width each relative group action takes; the channel part of the observation.
- :func:`project`: an action outside the allowed set, replaced by an allowed one.

Budget rule of a group action: with ``budget_l`` the layer's budget, ``used`` what its decided
groups spent and ``c_lo`` the cheapest per-row cost, width i is allowed for group g iff
``used + n_g · c_i + Σ_{later groups} n_h · c_lo ≤ budget_l``; the cheapest width always passes
once the layer action passed its own rule, so every episode ends within budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from automl_compress.database.tables import LayerTable
from automl_compress.envs import features
from automl_compress.plan import CompressionPlan

TOL = 1e-6


@dataclass(frozen=True)
class EpisodeSummary:
    """What one finished episode produced.

    Attributes:
        plan: the compression plan (always within budget).
        reward: the episode's return (step terms + end term).
        metric: the true held-out metric, ``nan`` when this episode was not measured.
        avg_bits: average bits per compressible weight (metadata included).
        proxy_error: the plan's summed exact table error.
        projections: actions that had to be projected onto the allowed set.
        steps: agent steps in the episode.
    """

    plan: CompressionPlan
    reward: float
    metric: float
    avg_bits: float
    proxy_error: float
    projections: int
    steps: int


def project(a: int, mask: np.ndarray, cost: np.ndarray) -> int:
    """The dearest allowed action costing no more than ``a`` (else the cheapest allowed).

    Args:
        a: the action asked for (any integer; out of range counts as the dearest).
        mask: the allowed actions.
        cost: each action's cost.

    Returns:
        An allowed action.
    """
    allowed = np.flatnonzero(mask)
    want = cost[a] if 0 <= a < len(cost) else np.inf
    cheaper = allowed[cost[allowed] <= want + TOL]
    if len(cheaper):
        return int(cheaper[np.argmax(cost[cheaper])])
    return int(allowed[np.argmin(cost[allowed])])


@dataclass
class LayerState:
    """Per-episode state of the layer being decided.

    Attributes:
        p: index into the table's patterns.
        budget: the bits the layer action granted.
        order: the kept rows, most important first.
        groups: the kept rows split into consecutive importance groups.
        row_bits: (rows,) the width given to each row so far (0: removed or undecided).
        used: bits spent by the decided groups.
        j: the next group to decide.
        prev_group: the width index the last group took.
    """

    p: int
    budget: float
    order: np.ndarray
    groups: list[np.ndarray]
    row_bits: np.ndarray
    used: float = 0.0
    j: int = 0
    prev_group: int = 0

    @property
    def decided(self) -> bool:
        """Whether every group has its width."""
        return self.j >= len(self.groups)

    def assign(self, width: int, bits: int, row_cost: float) -> np.ndarray:
        """Give the current group width index ``width`` and move to the next group.

        The width costs ``bits`` bits, ``row_cost`` bits per row.

        Returns:
            The group's rows.
        """
        rows = self.groups[self.j]
        self.row_bits[rows] = bits
        self.used += len(rows) * row_cost
        self.prev_group = width
        self.j += 1
        return rows

    def allowed_widths(self, ob: np.ndarray) -> np.ndarray:
        """Allowed width indices for the current group (absolute, by the budget rule).

        Args:
            ob: (bits,) the per-row cost of each width under the layer's pattern.
        """
        size = len(self.groups[self.j])
        rest = sum(len(g) for g in self.groups[self.j + 1:]) * float(ob.min())
        return self.used + size * ob + rest <= self.budget + TOL

    def relative_widths(self, ob: np.ndarray, n_bits: int) -> np.ndarray:
        """Width index taken by each group action: ``clip(i* + a − c, 0, nb − 1)``.

        Here i* is the dearest width whose per-row cost fits the budget left per undecided row, and
        c = (nb − 1) // 2.
        """
        undecided = sum(len(g) for g in self.groups[self.j:])
        share = (self.budget - self.used) / max(undecided, 1)
        fits = np.flatnonzero(ob <= share + TOL)
        i_star = int(fits[np.argmax(ob[fits])]) if len(fits) else int(np.argmin(ob))
        center = (n_bits - 1) // 2
        return np.clip(i_star + np.arange(n_bits) - center, 0, n_bits - 1)

    def channel_features(self, table: LayerTable, n_bits: int,
                         patterns: tuple[str, ...]) -> np.ndarray:
        """The observation's channel part for the current group.

        Its position and size, the budget left per undecided weight, the last width, the pattern,
        the group's error curve.

        Args:
            table: the layer's table.
            n_bits: menu bit-widths.
            patterns: the menu's patterns.
        """
        g = self.groups[self.j]
        channel = np.zeros(5 + sum(1 for b in table.bits if b > 0))
        undecided = sum(len(x) for x in self.groups[self.j:]) * table.info.cols
        channel[:5] = [
            self.j / len(self.groups), len(g) / table.info.rows,
            (self.budget - self.used) / max(undecided, 1) / 8.0,
            self.prev_group / max(n_bits - 1, 1),
            patterns.index(table.patterns[self.p]) / max(len(patterns) - 1, 1),
        ]
        channel[5:] = features.group_curve(table.errors[g, self.p, :], table.bits)
        return channel
