"""The compression environment: one episode walks the layers and spends a size budget.

Nothing is solved here: every number comes from the layer database's exact per-row tables
(:class:`~automl_compress.database.tables.LayerTable`). One episode visits the layers in forward
order. At each layer there are two kinds of decision (docs/env.md §1.2):

1. **Layer decision** (the layer controller): a pattern from the menu, a 0-bit fraction f (the
   ``floor(f·rows)`` least important rows are removed) and a budget level relative to the fair
   share of the budget left, one ``Discrete(patterns × fractions × levels)`` action
   (:mod:`automl_compress.envs.ladder` tabulates what each action means at each layer).
2. **Group decisions** (the channel controller): the kept rows, ranked by importance (the sum of
   their exact error curve under the pattern, most important first), are split into
   ``min(K, n_keep)`` groups; one ``Discrete(len(menu.bits))`` action per group gives the group's
   bit-width *relative to its fair share*: with i* the dearest width whose per-row cost fits the
   layer budget left per undecided row, action a takes width index ``clip(i* + a − c, 0, nb − 1)``
   with c = (nb − 1) // 2. Unused layer budget returns to the model's pool.

``mode`` says which decisions are the agent's: ``"layer"`` (group decisions come from
``channel_policy``), ``"channel"`` (layer decisions come from ``layer_policy``) or ``"flat"`` (both,
as one two-phase episode with one ``Discrete(max(...))`` action space and phase-dependent masks).
The env holds no controller: it is given one (:mod:`automl_compress.envs.policy`), a callable
``(obs, mask) -> action`` (e.g. a frozen model) or an allocator that decides a whole layer from the
tables (:mod:`automl_compress.agents.policies`: the exact knapsack, one width, the DP's layers).

Budget: with B the model's bit budget, U the bits already spent and m_j the cheapest possible
cost of layer j, a layer action is allowed iff ``U + budget_l + Σ_{j>l} m_j ≤ B``; a group action
iff ``layer_used + cost_g + Σ_{later groups} n_g · c_lo ≤ budget_l``
(:class:`~automl_compress.envs.episode.LayerState`). The cheapest choice always passes (by
induction from ``B ≥ Σ m_j``, checked at construction), so every episode ends within budget.
``action_masks()`` gives the allowed actions (sb3-contrib's MaskablePPO); an action outside the
mask (e.g. sampled by ``check_env``) is *projected* to the dearest allowed choice that costs no
more (else the cheapest), and the projection is reported in ``info["projected"]`` and counted in
``info["projections"]`` and the episode summary.

Observations: :mod:`automl_compress.envs.features`. Rewards: :mod:`automl_compress.envs.rewards`.
Episode bookkeeping (the summary, the layer being decided, projection):
:mod:`automl_compress.envs.episode`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from automl_compress.config import Config
from automl_compress.database.allocate import min_feasible_avg_bits
from automl_compress.database.tables import LayerTable
from automl_compress.envs import features, rewards
from automl_compress.envs.episode import TOL, EpisodeSummary, LayerState, project
from automl_compress.envs.ladder import build_ladder
from automl_compress.envs.policy import LayerAllocator, Policy, RowAllocator, RowRequest
from automl_compress.errors import ConfigError, InfeasibleBudgetError, InvalidInputError
from automl_compress.plan import CompressionPlan, LayerPlan

MODES = ("layer", "channel", "flat")
__all__ = ["MODES", "CompressionEnv"]


class CompressionEnv(gym.Env):
    """Gymnasium env over a model's layer tables (see the module docstring).

    Args:
        tables: the model's layer tables in forward order.
        cfg: the resolved config (menu, cost, env sections are read).
        mode: 'layer', 'channel' or 'flat'.
        layer_policy: in 'channel' mode: a :class:`LayerAllocator` or a callable
            ``(obs, mask) -> action``.
        channel_policy: in 'layer' mode: a :class:`RowAllocator` or a callable.
        metric_fn: ``plan -> metric or None`` for the episode-end term (None: no end term).
        metric_dense: the dense model's metric (the end term's reference).
        episode_hook: called with an :class:`EpisodeSummary` after every episode.

    Raises:
        InfeasibleBudgetError: the budget is below the smallest feasible one.
        ConfigError: a mode without the policies it needs.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        tables: Sequence[LayerTable],
        cfg: Config,
        mode: str = "flat",
        layer_policy: LayerAllocator | Policy | None = None,
        channel_policy: RowAllocator | Policy | None = None,
        metric_fn: Callable[[CompressionPlan], float | None] | None = None,
        metric_dense: float = 1.0,
        episode_hook: Callable[[EpisodeSummary], None] | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"env mode must be one of {MODES}, found {mode!r}")
        if mode == "layer" and channel_policy is None:
            raise ConfigError("mode 'layer' needs a channel_policy (a RowAllocator such as "
                              "agents.policies.KnapsackChannels, or a callable), found None")
        if mode == "channel" and layer_policy is None:
            raise ConfigError("mode 'channel' needs a layer_policy (a LayerAllocator such as "
                              "agents.policies.DPLayers, or a callable), found None")
        if not tables:
            raise InvalidInputError("the environment needs at least one layer table, found none")
        self.tables = list(tables)
        self.cfg = cfg
        self.mode = mode
        self.layer_policy = layer_policy
        self.channel_policy = channel_policy
        self.metric_fn = metric_fn
        self.metric_dense = float(metric_dense)
        self.episode_hook = episode_hook
        ecfg = cfg.env
        self.menu_bits = tuple(sorted(int(b) for b in cfg.menu.bits))
        self.menu_patterns = tuple(cfg.menu.patterns)
        for t in self.tables:
            if tuple(t.bits) != self.menu_bits:
                raise InvalidInputError(
                    f"layer {t.info.name!r} has bits {list(t.bits)} but the menu has "
                    f"{list(self.menu_bits)}; rebuild the database with this menu"
                )
        self.fractions = ecfg.prune_fractions if self.menu_bits[0] == 0 else (0.0,)
        self.levels = ecfg.layer_levels
        self.K = ecfg.groups
        self._precompute()
        self.n_layer_actions = self.ladder.n
        self.n_bits = len(self.menu_bits)
        n = {"layer": self.n_layer_actions, "channel": self.n_bits,
             "flat": max(self.n_layer_actions, self.n_bits)}[mode]
        self.action_space = gym.spaces.Discrete(n)
        self.layout = features.budget_layout(self.menu_bits, len(self.menu_patterns))
        self.observation_space = gym.spaces.Box(
            -features.OBS_CLIP, features.OBS_CLIP, shape=(self.layout.size,), dtype=np.float32
        )
        self._reset_state()

    # -------------------------------------------------------------------------------------
    # Static tables

    def _precompute(self) -> None:
        cost = self.cfg.cost
        self.option_bits = [t.option_bits(cost) for t in self.tables]
        self.numel = np.array([t.info.numel for t in self.tables], dtype=np.float64)
        self.total_weights = float(self.numel.sum())
        self.budget_total = self.cfg.env.budget_bits * self.total_weights
        layer_min = np.array([t.info.rows * float(ob.min()) for t, ob in
                              zip(self.tables, self.option_bits, strict=True)])
        if self.budget_total < layer_min.sum() - TOL:
            raise InfeasibleBudgetError(
                self.cfg.env.budget_bits, min_feasible_avg_bits(self.tables, cost)
            )
        # min_rest[l] = cheapest possible cost of layers l..L-1
        self.min_rest = np.concatenate([np.cumsum(layer_min[::-1])[::-1], [0.0]])
        self.static = features.layer_static(self.tables, self.menu_bits, self.menu_patterns)
        self.e_ref = rewards.reference_error(self.tables, self.option_bits,
                                             self.cfg.env.budget_bits)
        self.ladder = build_ladder(self.tables, self.option_bits, self.menu_patterns,
                                   self.fractions, self.levels)
        # importance order of rows per (layer, pattern): exact error curve summed, descending
        self.importance = [
            [np.argsort(-t.errors[:, p, :].sum(axis=1), kind="stable") for p in
             range(len(t.patterns))] for t in self.tables
        ]

    # -------------------------------------------------------------------------------------
    # Gymnasium API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode (gymnasium ``reset``): the observation and ``{'phase'}``."""
        super().reset(seed=seed)
        self._reset_state()
        self._advance()
        return self._obs(), {"phase": self._phase}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Apply one layer or group action and move to the next decision (gymnasium ``step``)."""
        if self._done:
            raise InvalidInputError("step() called on a finished episode; call reset() first")
        a = int(np.asarray(action).reshape(-1)[0])
        self._steps += 1
        projected = self._layer_step(a) if self._phase == "layer" else self._group_step(a)
        self._projections += int(projected)
        self._advance()
        reward = self._take_pending()
        info: dict[str, Any] = {"projected": bool(projected), "projections": self._projections,
                                "phase": self._phase}
        if self._done:
            reward += self._finish_episode()
        self._return += reward
        if self._done:
            self.summary = dataclasses.replace(self.summary, reward=float(self._return))
            info["compression"] = self.summary
            if self.episode_hook is not None:
                self.episode_hook(self.summary)
        return self._obs(), float(reward), self._done, False, info

    def action_masks(self) -> np.ndarray:
        """The allowed actions at the current decision (bool, length ``action_space.n``)."""
        mask = np.zeros(self.action_space.n, dtype=bool)
        if self._done:
            mask[0] = True
            return mask
        if self._phase == "layer":
            mask[: self.n_layer_actions] = self._layer_mask()
        else:
            mask[: self.n_bits] = self._group_mask()
        return mask

    # -------------------------------------------------------------------------------------
    # Episode state

    def _reset_state(self) -> None:
        self._l = 0
        self._phase = "layer"
        self._used = 0.0
        self._layer: LayerState | None = None
        self._plan: dict[str, LayerPlan] = {}
        self._pending = 0.0
        self._error = 0.0
        self._projections = 0
        self._steps = 0
        self._return = 0.0
        self._done = False
        self._prev_layer = (0.0, 0.0, 0.0)
        self.summary: EpisodeSummary | None = None

    def _take_pending(self) -> float:
        r = rewards.step_reward(self._pending, self.e_ref, self.cfg.env.step_reward_weight)
        self._pending = 0.0
        return r

    def _charge(self, err: float) -> None:
        self._pending += err
        self._error += err

    def _layer_budgets(self) -> np.ndarray:
        """Bits each layer action grants.

        The kept weights × fair share × the level's multiplier, clipped to [cheapest, dearest] cost
        of the kept rows (level 0: the cheapest).
        """
        l_ = self._l
        fair = (self.budget_total - self._used) / max(float(self.numel[l_:].sum()), 1.0)
        return self.ladder.budgets(l_, fair)

    def _layer_mask(self) -> np.ndarray:
        lim = self.budget_total - self._used - self.min_rest[self._l + 1] + TOL
        return self.ladder.valid[self._l] & (self._layer_budgets() <= lim)

    def _group_mask(self) -> np.ndarray:
        st = self._layer
        assert st is not None
        ob = self.option_bits[self._l][st.p]
        return st.allowed_widths(ob)[st.relative_widths(ob, self.n_bits)]

    def _layer_step(self, a: int) -> bool:
        mask = self._layer_mask()
        projected = not (0 <= a < self.n_layer_actions and mask[a])
        if projected:
            a = project(a, mask, self._layer_budgets())
        self._apply_layer(a)
        return projected

    def _apply_layer(self, a: int) -> None:
        pi, fi, k = self.ladder.decode(a)
        self._start_layer(int(self.ladder.pattern[self._l][a]), int(self.ladder.pruned[self._l][a]),
                          float(self._layer_budgets()[a]))
        self._prev_layer = (k / (self.levels - 1), pi / max(len(self.menu_patterns) - 1, 1),
                            self.fractions[fi])

    def _start_layer(self, p: int, n_pruned: int, budget: float) -> None:
        t = self.tables[self._l]
        order = self.importance[self._l][p]
        keep = t.info.rows - n_pruned
        kept, removed = order[:keep], order[keep:]
        row_bits = np.zeros(t.info.rows, dtype=np.int64)
        if len(removed):
            self._charge(float(t.errors[removed, p, 0].sum()))
        groups = np.array_split(kept, min(self.K, keep)) if keep > 0 else []
        self._layer = LayerState(p, budget, kept, list(groups), row_bits)
        self._phase = "group"

    def _group_step(self, a: int) -> bool:
        st = self._layer
        assert st is not None
        ob = self.option_bits[self._l][st.p]
        mask = self._group_mask()
        projected = not (0 <= a < self.n_bits and mask[a])
        if projected:
            a = project(a, mask, ob[st.relative_widths(ob, self.n_bits)])
        w = int(st.relative_widths(ob, self.n_bits)[a])
        rows = st.assign(w, self.menu_bits[w], float(ob[w]))
        self._charge(float(self.tables[self._l].errors[rows, st.p, w].sum()))
        return projected

    def _finish_layer(self) -> None:
        st, t = self._layer, self.tables[self._l]
        assert st is not None
        self._used += st.used
        self._plan[t.info.name] = LayerPlan(t.patterns[st.p], tuple(int(b) for b in st.row_bits))
        self._layer = None
        self._l += 1
        self._phase = "layer"
        if self._l == len(self.tables):
            self._done = True

    def _advance(self) -> None:
        """Make the automatic decisions until the agent must act or the episode ends."""
        while not self._done:
            if self._phase == "layer":
                if self.mode in ("layer", "flat"):
                    return
                self._auto_layer()
                continue
            st = self._layer
            assert st is not None
            if st.decided:
                self._finish_layer()
                continue
            if self.mode in ("channel", "flat"):
                return
            self._auto_groups()

    def _auto_layer(self) -> None:
        if isinstance(self.layer_policy, LayerAllocator):
            p, budget = self.layer_policy.choose_layer(self.tables[self._l],
                                                       self.option_bits[self._l])
            self._start_layer(p, 0, budget)
            return
        assert callable(self.layer_policy)
        a = int(self.layer_policy(self._obs(), self._layer_mask()))
        self._projections += int(self._layer_step(a))

    def _auto_groups(self) -> None:
        st, t = self._layer, self.tables[self._l]
        assert st is not None
        if isinstance(self.channel_policy, RowAllocator):
            ob = self.option_bits[self._l][st.p]
            idx = self.channel_policy.fill_rows(
                RowRequest(t, st.p, st.order, st.budget, ob, self.cfg.cost))
            st.row_bits[st.order] = np.asarray(t.bits)[idx]
            st.used += float(ob[idx].sum())
            self._charge(float(t.errors[st.order, st.p, idx].sum()))
            st.j = len(st.groups)
            return
        assert callable(self.channel_policy)
        while not st.decided:
            a = int(self.channel_policy(self._obs(), self._group_mask()))
            self._projections += int(self._group_step(a))

    def _finish_episode(self) -> float:
        plan = CompressionPlan(dict(self._plan), meta={
            "method": "rl", "budget_bits": float(self.cfg.env.budget_bits)})
        m = self.metric_fn(plan) if self.metric_fn is not None else None
        metric = float(m) if m is not None else math.nan
        end = rewards.metric_reward(m, self.metric_dense, self.cfg.env.metric_reward_weight)
        self.summary = EpisodeSummary(
            plan=plan, reward=0.0, metric=metric, avg_bits=self._used / self.total_weights,
            proxy_error=self._error, projections=self._projections, steps=self._steps,
        )
        return end

    # -------------------------------------------------------------------------------------
    # Observation

    def _obs(self) -> np.ndarray:
        l_ = min(self._l, len(self.tables) - 1)
        rem_weights = float(self.numel[self._l:].sum()) if not self._done else 0.0
        budget = [
            self._used / self.budget_total,
            (self.budget_total - self._used) / max(rem_weights, 1.0) / 8.0,
            rem_weights / self.total_weights,
        ]
        st = self._layer
        if st is not None and self._phase == "group" and not st.decided:
            channel = st.channel_features(self.tables[self._l], self.n_bits, self.menu_patterns)
            phase = 1.0
        else:
            channel = np.zeros(5 + sum(1 for b in self.menu_bits if b > 0))
            phase = 0.0
        return self.layout.build(layer=self.static[l_], budget=budget, previous=self._prev_layer,
                                 channel=channel, phase=[phase])
