"""The HAQ-style baseline's environment (docs/env.md §5): one continuous action per layer.

The agent is SB3's DDPG (:func:`automl_compress.agents.controllers.make_ddpg`).

One continuous action a ∈ [0, 1] per layer, mapped to a bit-width of the menu's non-zero widths
``round(lo − 0.5 + a·(hi − lo + 1))`` over their index range, all rows of the layer at that width,
dense pattern (HAQ has no pruning). No reward until the episode ends. The budget is then enforced
by HAQ's *action wall*: while the plan is over budget, layers are lowered one menu step at a time,
from the last layer backwards (to 0 bits when even the lowest width does not fit). Every lowering
is counted in ``projections`` (reported in ``info`` and TensorBoard).

End reward: the same formula as the main env (rewards.py), all paid at the end:
``−w_step · plan_error / E_ref + w_metric · 10 · (m − m_dense)/|m_dense|``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from automl_compress.config import Config
from automl_compress.database.allocate import min_feasible_avg_bits
from automl_compress.database.tables import LayerTable
from automl_compress.envs import features, rewards
from automl_compress.envs.episode import EpisodeSummary
from automl_compress.errors import InfeasibleBudgetError
from automl_compress.plan import CompressionPlan, LayerPlan


class HAQEnv(gym.Env):
    """One continuous action per layer, reward at the end, action wall for the budget.

    Args:
        tables: layer tables in forward order.
        cfg: the resolved config.
        metric_fn: ``plan -> metric or None``.
        metric_dense: the dense metric.
        episode_hook: called with an :class:`EpisodeSummary` after every episode.
    """

    metadata = {"render_modes": []}

    def __init__(self, tables: Sequence[LayerTable], cfg: Config,
                 metric_fn: Callable[[CompressionPlan], float | None] | None = None,
                 metric_dense: float = 1.0,
                 episode_hook: Callable[[EpisodeSummary], None] | None = None) -> None:
        super().__init__()
        self.tables, self.cfg = list(tables), cfg
        self.metric_fn, self.metric_dense, self.episode_hook = metric_fn, metric_dense, episode_hook
        self.menu_bits = tuple(sorted(int(b) for b in cfg.menu.bits))
        self.nz = [k for k, b in enumerate(self.menu_bits) if b > 0]
        self.option_bits = [t.option_bits(cfg.cost)[0] for t in self.tables]  # dense pattern
        self.numel = np.array([t.info.numel for t in self.tables], dtype=np.float64)
        self.budget_total = cfg.env.budget_bits * self.numel.sum()
        dense_min = sum(t.info.rows * float(ob.min()) for t, ob in
                        zip(self.tables, self.option_bits, strict=True))
        if self.budget_total < dense_min - 1e-6:
            raise InfeasibleBudgetError(cfg.env.budget_bits, min_feasible_avg_bits(
                self.tables, cfg.cost), detail="HAQ baseline: dense pattern only")
        self.static = features.layer_static(self.tables, self.menu_bits, cfg.menu.patterns)
        self.e_ref = rewards.reference_error(self.tables, [t.option_bits(cfg.cost) for t in
                                                           self.tables], cfg.env.budget_bits)
        self.layout = features.budget_layout(self.menu_bits, len(cfg.menu.patterns))
        self.observation_space = gym.spaces.Box(-features.OBS_CLIP, features.OBS_CLIP,
                                                (self.layout.size,), np.float32)
        self.action_space = gym.spaces.Box(0.0, 1.0, (1,), np.float32)
        self._reset_state()

    def _reset_state(self) -> None:
        self._l, self._choice, self._prev = 0, [], 0.0

    def _obs(self) -> np.ndarray:
        l_ = min(self._l, len(self.tables) - 1)
        used = sum(self.tables[i].info.rows * float(self.option_bits[i][k])
                   for i, k in enumerate(self._choice))
        rem = float(self.numel[self._l:].sum())
        budget = [used / self.budget_total, (self.budget_total - used) / max(rem, 1.0) / 8.0,
                  rem / self.numel.sum()]
        return self.layout.build(layer=self.static[l_], budget=budget,
                                 previous=[self._prev, 0.0, 0.0],
                                 channel=np.zeros(5 + len(self.nz)), phase=[0.0])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start an episode at the first layer (gymnasium ``reset``)."""
        super().reset(seed=seed)
        self._reset_state()
        return self._obs(), {}

    def step(self, action: Any):
        """Choose the current layer's bit-width from the action in [0, 1] (gymnasium ``step``)."""
        a = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], 0.0, 1.0))
        lo, hi = 0, len(self.nz) - 1
        k = int(np.clip(round(lo - 0.5 + a * (hi - lo + 1)), lo, hi))
        self._choice.append(self.nz[k])
        self._prev = a
        self._l += 1
        if self._l < len(self.tables):
            return self._obs(), 0.0, False, False, {"projected": False}
        walls = self._action_wall()
        plan = CompressionPlan({t.info.name: LayerPlan("dense", (self.menu_bits[k],) * t.info.rows)
                                for t, k in zip(self.tables, self._choice, strict=True)},
                               meta={"method": "rl", "form": "haq",
                                     "budget_bits": float(self.cfg.env.budget_bits)})
        err = float(sum(t.errors[:, 0, k].sum() for t, k in
                        zip(self.tables, self._choice, strict=True)))
        m = self.metric_fn(plan) if self.metric_fn is not None else None
        reward = rewards.step_reward(err, self.e_ref, self.cfg.env.step_reward_weight) + \
            rewards.metric_reward(m, self.metric_dense, self.cfg.env.metric_reward_weight)
        s = EpisodeSummary(plan, float(reward), float(m) if m is not None else math.nan,
                           self._bits() / self.numel.sum(), err, walls, len(self.tables))
        if self.episode_hook is not None:
            self.episode_hook(s)
        return self._obs(), float(reward), True, False, {"projected": walls > 0,
                                                        "projections": walls, "compression": s}

    def _bits(self) -> float:
        return float(sum(t.info.rows * self.option_bits[i][k]
                         for i, (t, k) in enumerate(zip(self.tables, self._choice, strict=True))))

    def _action_wall(self) -> int:
        walls = 0
        while self._bits() > self.budget_total + 1e-6:
            lowered = False
            for i in range(len(self.tables) - 1, -1, -1):
                k = self._choice[i]
                if k > 0:
                    self._choice[i] = k - 1
                    walls += 1
                    lowered = True
                    if self._bits() <= self.budget_total + 1e-6:
                        break
            if not lowered:
                break
        return walls
