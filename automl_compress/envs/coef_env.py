"""The coefficient environment: the two controllers steer the exact DP instead of replacing it.

One episode walks the layers in forward order (docs/env.md §1.1). At layer l:

1. **Layer decision** (the layer controller): one of ``env.coef_levels`` values
   ``u_l ∈ [−coef_span, coef_span]`` (log10 scale, the middle one is 0): the layer's error is
   weighted by ``10^u_l`` in the DP over layers (SPDY's per-layer coefficient, chosen from the
   layer's architecture-agnostic features and the budget instead of searched per model).
2. **Group decisions** (the channel controller): the layer's rows, ranked by importance (their
   summed objective-weighted error curve, most important first), are split into
   ``min(env.groups, rows)`` groups; one value ``v_lg`` per group weights those rows' errors by
   ``10^v_lg`` inside the exact per-row knapsack.

After the last layer the plan is the exact DP over layers on the weighted tables, realised by the
exact in-layer knapsack: every action vector gives a feasible plan within budget, and the all-zero
(middle) action gives exactly the calibrated DP plan. So a learned controller can only move away
from the calibrated optimum of the proxy where the true metric disagrees with it.

Anchor (``env.coef_anchor``): with 'dp' an action is the coefficient itself, so the all-neutral
episode is the calibrated DP plan. With 'best' an action is a move from the incumbent, the
best-scoring action vector found so far at the episode's budget (:class:`Anchors`, shared by both
controllers' envs; the DP's until an episode scores higher): the level taken is the incumbent's
plus ``a − neutral``, clipped to the ladder, so the all-neutral episode repeats the incumbent and a
policy learns which moves from it pay (a learned local search). The observation carries the
incumbent's coefficient at the decision.

Budget: each episode's budget is drawn from ``budgets`` (one budget, or the grid of a
``--budget-range``) unless ``reset(options={"budget": B})`` names one; the observation carries it,
so one policy serves every budget in the range. With ``env.budget_draw='gap'`` a range's draw is
weighted by what a budget has left to gain (:func:`gap_weights`): the dense metric minus the
budget's incumbent score (the DP plan's measured score while there is none), plus a floor.

Reward (only at the end, gamma = 1):

    r = w_metric · 10 · (m − m_ref(B)) / |m_ref(B)|  −  w_proxy · (E − E_dp(B)) / E_dp(B)

with m the plan's validation metric (when the orchestrator measured it; else the first term is 0),
m_ref(B) the calibrated DP plan's validation metric at the same budget and validation fraction,
E the plan's objective-weighted proxy error and E_dp(B) the DP plan's (the DP minimises E, so the
second term is a penalty for leaving the proxy optimum that the metric term must outweigh);
w_metric = ``env.metric_reward_weight``, w_proxy = ``env.coef_proxy_weight``. With the 'best'
anchor the reward is the improvement over the incumbent only,

    r = w_metric · 10 · max(0, m − m_inc(B)) / |m_inc(B)|,

m_inc(B) the incumbent's metric on the same fraction (m_ref(B) until one is found): a move that
does not improve is paid 0, like repeating the incumbent, so the policy is not driven to stop
exploring; a plan that scores higher becomes the incumbent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from automl_compress.config import Config
from automl_compress.database.allocate import (
    allocate_dp,
    knapsack_memo,
    layer_candidates,
    min_feasible_avg_bits,
    plan_avg_bits,
    plan_error,
)
from automl_compress.database.knapsack import ENV_KEPT_BYTES, KeptTables
from automl_compress.database.tables import LayerTable
from automl_compress.envs import features
from automl_compress.envs.episode import EpisodeSummary
from automl_compress.errors import ConfigError, InfeasibleBudgetError, InvalidInputError
from automl_compress.plan import CompressionPlan

COEF_MODES = ("layer", "channel")
NEUTRAL = "neutral"
Policy = Callable[[np.ndarray, np.ndarray], int]
GAP_FLOOR = 0.1  # the 'gap' draw's floor weight, as a share of the mean gap


def gap_weights(gaps: Sequence[float | None], floor: float = GAP_FLOOR) -> np.ndarray:
    """The 'gap' budget draw's probabilities from each budget's gap below the dense metric.

    A budget's weight is its gap (clipped at 0) plus ``floor`` times the mean gap, so no budget
    starves; a gap not known yet (None: nothing measured there, and measuring it would spend an
    evaluation) counts as the largest known one. Uniform while no gap is known or all are 0.
    """
    known = [max(float(g), 0.0) for g in gaps if g is not None and math.isfinite(g)]
    top = max(known, default=0.0)
    w = np.array([top if g is None or not math.isfinite(g) else max(float(g), 0.0)
                  for g in gaps])
    w = w + floor * float(w.mean())
    total = float(w.sum())
    return w / total if total > 0 else np.full(len(gaps), 1.0 / len(gaps))


@dataclass(frozen=True)
class Incumbent:
    """The best-scoring action vector at one budget (ladder indices) and its scores."""

    u: tuple[int, ...]
    v: tuple[tuple[int, ...], ...]
    metric: float
    proxy_error: float


@dataclass
class Anchors:
    """The incumbents of the 'best' anchor, per budget; shared by the envs of one search."""

    best: dict[float, Incumbent] = field(default_factory=dict)

    def get(self, budget: float) -> Incumbent | None:
        """The incumbent at ``budget`` (None: none yet, the DP plan is the anchor)."""
        return self.best.get(round(float(budget), 6))

    def offer(self, budget: float, inc: Incumbent) -> bool:
        """Make ``inc`` the incumbent at ``budget`` if it scores higher; whether it did."""
        cur = self.get(budget)
        if cur is not None and not inc.metric > cur.metric:
            return False
        self.best[round(float(budget), 6)] = inc
        return True

    def lend(self, budget: float, trained: Sequence[float]) -> float | None:
        """Give a budget between the training budgets the incumbent of the nearest one below.

        A zero-shot rollout at a budget its run never trained at would start from the DP plan;
        between two training budgets it starts instead from the incumbent of the nearest lower
        budget that has one, its coefficients re-planned by the DP at ``budget``
        (docs/benchmarks.md §3, "Between the training budgets"). A training budget keeps what
        its run left, incumbent or none; outside the training budgets' span (a single-budget
        policy anywhere else, or beyond a range) nothing is lent: that was not measured.

        Args:
            budget: the rollout's budget.
            trained: the budgets the policy trained at.

        Returns:
            The budget lent from, or None (a training budget, outside their span, an incumbent
            of its own, or no incumbent below).
        """
        key = round(float(budget), 6)
        if (key in self.best or not min(trained) < key < max(trained)
                or any(abs(key - float(b)) < 1e-6 for b in trained)):
            return None
        below = max((b for b in self.best if b < key), default=None)
        if below is not None:
            self.best[key] = self.best[below]
        return below

    def state(self) -> dict[str, Any]:
        """JSON-ready data for a checkpoint."""
        return {str(b): {"u": list(x.u), "v": [list(g) for g in x.v], "metric": x.metric,
                         "proxy_error": x.proxy_error} for b, x in self.best.items()}

    def restore(self, state: dict[str, Any]) -> None:
        """Set the incumbents back from :meth:`state`'s data."""
        self.best = {float(b): Incumbent(tuple(int(a) for a in x["u"]),
                                         tuple(tuple(int(a) for a in g) for g in x["v"]),
                                         float(x["metric"]), float(x["proxy_error"]))
                     for b, x in state.items()}


class CoefficientEnv(gym.Env):
    """Gymnasium env whose actions are the DP's per-layer and per-group coefficients.

    Args:
        tables: the objective-weighted layer tables in forward order.
        cfg: the resolved config (menu, cost, env sections are read).
        mode: 'layer' (the agent takes layer decisions) or 'channel' (group decisions).
        layer_policy: in 'channel' mode: 'neutral' (u = 0) or a callable ``(obs, mask) -> a``.
        channel_policy: in 'layer' mode: 'neutral' (v = 0: the exact knapsack) or a callable.
        metric_fn: ``(plan, budget) -> metric or None`` (None: not measured this episode).
        reference_fn: ``budget -> m_ref``, the calibrated DP plan's metric on the same split.
        episode_hook: called with an :class:`EpisodeSummary` after every episode.
        budgets: the budgets episodes draw from (default: ``cfg.env.budget_bits``).
        anchors: the incumbents with ``env.coef_anchor='best'`` (share one between the envs of
            a search; default: the env's own).
        metric_dense: the dense model's validation metric, the target of
            ``env.budget_draw='gap'`` (None: no gap is known, the draw is uniform).
        known_reference: ``budget -> m_ref or None``: the DP plan's score where it was already
            measured, without spending an evaluation (the 'gap' draw's score of a budget with no
            incumbent; None: a budget without incumbent has no known gap).

    Raises:
        InfeasibleBudgetError: a budget below the smallest feasible one.
        ConfigError: an unknown mode.
    """

    metadata = {"render_modes": []}

    def __init__(
        self, tables: Sequence[LayerTable], cfg: Config, mode: str = "layer",
        layer_policy: str | Policy = NEUTRAL, channel_policy: str | Policy = NEUTRAL,
        metric_fn: Callable[[CompressionPlan, float], float | None] | None = None,
        reference_fn: Callable[[float], float] | None = None,
        episode_hook: Callable[[EpisodeSummary], None] | None = None,
        budgets: Sequence[float] | None = None, anchors: Anchors | None = None,
        metric_dense: float | None = None,
        known_reference: Callable[[float], float | None] | None = None,
    ) -> None:
        super().__init__()
        if mode not in COEF_MODES:
            raise ConfigError(f"coefficient env mode must be one of {COEF_MODES}, found {mode!r}")
        if not tables:
            raise InvalidInputError("the environment needs at least one layer table, found none")
        self.tables, self.cfg, self.mode = list(tables), cfg, mode
        self.layer_policy, self.channel_policy = layer_policy, channel_policy
        self.metric_fn, self.reference_fn, self.episode_hook = metric_fn, reference_fn, \
            episode_hook
        e = cfg.env
        self.anchors = (anchors if anchors is not None else Anchors()) \
            if e.coef_anchor == "best" else None
        self.budgets = tuple(float(b) for b in (budgets or (e.budget_bits,)))
        self.metric_dense, self.known_reference = metric_dense, known_reference
        self.min_bits = min_feasible_avg_bits(self.tables, cfg.cost)
        for b in self.budgets:
            if b < self.min_bits - 1e-12:
                raise InfeasibleBudgetError(b, self.min_bits)
        menu_bits = tuple(sorted(int(b) for b in cfg.menu.bits))
        self.nz = sum(1 for b in menu_bits if b > 0)
        self.values = np.linspace(-e.coef_span, e.coef_span, e.coef_levels)
        self.neutral = (e.coef_levels - 1) // 2
        self.action_space = gym.spaces.Discrete(e.coef_levels)
        self.layout = features.coef_layout(menu_bits, len(cfg.menu.patterns))
        self.observation_space = gym.spaces.Box(-features.OBS_CLIP, features.OBS_CLIP,
                                                shape=(self.layout.size,), dtype=np.float32)
        self.static = features.layer_static(self.tables, menu_bits, cfg.menu.patterns)
        self.groups = []
        self.group_feats = []
        for t in self.tables:
            order = np.argsort(-t.errors.sum(axis=(1, 2)), kind="stable")
            gs = np.array_split(order, min(e.groups, t.info.rows))
            self.groups.append(gs)
            self.group_feats.append([
                np.array([len(g) / t.info.rows, *features.group_curve(t.errors[g, 0, :], t.bits)])
                for g in gs])
        self._cands: dict[tuple, tuple[LayerTable, list]] = {}
        self._knapsacks: dict[tuple, dict] = {}
        self._plans: dict[tuple, CompressionPlan] = {}
        self._dp_error: dict[float, float] = {}
        self._reset_state(self.budgets[0])

    # -------------------------------------------------------------------------------------
    # Gymnasium API

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode at ``options['budget']`` (default: a random one of ``budgets``)."""
        super().reset(seed=seed)
        budget = (options or {}).get("budget")
        if budget is None:
            budget = self._draw_budget()
        elif float(budget) < self.min_bits - 1e-12:
            raise InfeasibleBudgetError(float(budget), self.min_bits)
        self._reset_state(float(budget))
        self._advance()
        return self._obs(), {"phase": self._phase, "budget": self.budget}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Apply one coefficient action and move to the next decision (gymnasium ``step``)."""
        if self._done:
            raise InvalidInputError("step() called on a finished episode; call reset() first")
        a = int(np.asarray(action).reshape(-1)[0])
        projected = not 0 <= a < len(self.values)
        a = min(max(a, 0), len(self.values) - 1)
        self._steps += 1
        self._projections += int(projected)
        self._apply(a)
        self._advance()
        info: dict[str, Any] = {"projected": projected, "projections": self._projections,
                                "phase": self._phase, "budget": self.budget}
        reward = 0.0
        if self._done:
            reward = self._finish()
            info["compression"] = self.summary
            if self.episode_hook is not None:
                self.episode_hook(self.summary)
        return self._obs(), float(reward), self._done, False, info

    def action_masks(self) -> np.ndarray:
        """Every coefficient is allowed (the DP keeps every plan within budget)."""
        return np.ones(self.action_space.n, dtype=bool)

    # -------------------------------------------------------------------------------------
    # Episode

    def _draw_budget(self) -> float:
        """An episode's budget from ``budgets``, as ``env.budget_draw`` says."""
        n = len(self.budgets)
        if self.cfg.env.budget_draw == "gap" and n > 1:
            return self.budgets[int(self.np_random.choice(n, p=self.draw_probabilities()))]
        return self.budgets[int(self.np_random.integers(n))]

    def budget_gap(self, budget: float) -> float | None:
        """How far ``budget``'s incumbent (else the DP plan's known score) is below dense."""
        if self.metric_dense is None:
            return None
        inc = self.anchors.get(budget) if self.anchors is not None else None
        m = inc.metric if inc is not None else (
            self.known_reference(budget) if self.known_reference is not None else None)
        return None if m is None else float(self.metric_dense) - float(m)

    def draw_probabilities(self) -> np.ndarray:
        """The 'gap' draw's probability of each of ``budgets`` now (:func:`gap_weights`)."""
        return gap_weights([self.budget_gap(b) for b in self.budgets])

    def _reset_state(self, budget: float) -> None:
        L = len(self.tables)
        self.budget = budget
        inc = self.anchors.get(budget) if self.anchors is not None else None
        if inc is None:
            self._base_u = np.full(L, self.neutral, dtype=np.int64)
            self._base_v = [np.full(len(g), self.neutral, dtype=np.int64) for g in self.groups]
        else:
            self._base_u = np.asarray(inc.u, dtype=np.int64)
            self._base_v = [np.asarray(g, dtype=np.int64) for g in inc.v]
        self._u = self._base_u.copy()
        self._v = [g.copy() for g in self._base_v]
        self._l, self._j, self._phase = 0, 0, "layer"
        self._steps, self._projections, self._done = 0, 0, False
        self.summary: EpisodeSummary | None = None

    def _level(self, a: int, base: int) -> int:
        """The ladder index action ``a`` takes (a move from ``base`` with the 'best' anchor)."""
        if self.anchors is None:
            return a
        return min(max(base + a - self.neutral, 0), len(self.values) - 1)

    def _apply(self, a: int) -> None:
        if self._phase == "layer":
            self._u[self._l] = self._level(a, self._base_u[self._l])
            self._phase, self._j = "group", 0
        else:
            self._v[self._l][self._j] = self._level(a, self._base_v[self._l][self._j])
            self._j += 1
        if self._phase == "group" and self._j >= len(self.groups[self._l]):
            self._l += 1
            self._phase = "layer"
            self._done = self._l >= len(self.tables)

    def _advance(self) -> None:
        """Take the frozen partner's decisions until the agent must act or the episode ends."""
        while not self._done:
            agent_acts = (self._phase == "layer") == (self.mode == "layer")
            if agent_acts:
                return
            policy = self.channel_policy if self._phase == "group" else self.layer_policy
            if policy == NEUTRAL:
                a = self.neutral
            else:
                assert callable(policy)
                a = int(policy(self._obs(), self.action_masks()))
            self._apply(min(max(a, 0), len(self.values) - 1))

    # -------------------------------------------------------------------------------------
    # The plan

    def _layer_candidates(self, l_: int, v: np.ndarray) -> tuple[LayerTable, list, dict]:
        key = (l_, tuple(int(x) for x in v))
        if key not in self._cands:
            t = self.tables[l_]
            mult = np.empty(t.info.rows)
            for g, level in zip(self.groups[l_], v, strict=True):
                mult[g] = 10.0 ** self.values[level]
            wt = LayerTable(t.info, t.bits, t.patterns, t.errors * mult[:, None, None])
            # the third item keeps this weighted layer's knapsack tables (database.knapsack),
            # one set per multiplier vector, so small ones; a new vector is mostly realised at
            # one budget per pattern, so its curves compute their least errors alone and a
            # table with choices is built only for the budgets asked
            kept = KeptTables(ENV_KEPT_BYTES, runs=False, curve_choices=False)
            self._cands[key] = (wt, layer_candidates(wt, self.cfg.cost, tables=kept), kept)
        return self._cands[key]

    def plan_for(self, budget: float, u: Sequence[int], v: Sequence[Sequence[int]]) \
            -> CompressionPlan:
        """The plan of an action vector: the DP over the group- and layer-weighted tables."""
        key = (budget, tuple(int(x) for x in u), tuple(tuple(int(x) for x in g) for g in v))
        if key not in self._plans:
            pairs = [self._layer_candidates(i, np.asarray(g)) for i, g in enumerate(v)]
            # knapsack solutions depend on the group multipliers only, not on u or the budget
            # a layer's knapsack tables depend on its own multipliers only
            memo = self._knapsacks.get(key[2])
            if memo is None:
                memo = self._knapsacks[key[2]] = knapsack_memo([p[2] for p in pairs])
            plan = allocate_dp([p[0] for p in pairs], budget, self.cfg.cost,
                               layer_weights=10.0 ** self.values[np.asarray(u)],
                               candidates=[p[1] for p in pairs], memo=memo)
            self._plans[key] = CompressionPlan(plan.layers, meta={"method": "rl",
                                                                  "budget_bits": budget})
        return self._plans[key]

    def dp_error(self, budget: float) -> float:
        """The calibrated DP plan's proxy error at ``budget`` (the all-neutral action)."""
        if budget not in self._dp_error:
            neutral = self.plan_for(budget, [self.neutral] * len(self.tables),
                                    [[self.neutral] * len(g) for g in self.groups])
            self._dp_error[budget] = plan_error(neutral, self.tables)
        return self._dp_error[budget]

    def _finish(self) -> float:
        plan = self.plan_for(self.budget, self._u, self._v)
        err = plan_error(plan, self.tables)
        e = self.cfg.env
        m = self.metric_fn(plan, self.budget) if self.metric_fn is not None else None
        measured = m is not None and math.isfinite(m) and self.reference_fn is not None
        if self.anchors is None:
            ref_err = max(self.dp_error(self.budget), 1e-300)
            reward = -e.coef_proxy_weight * (err - ref_err) / ref_err
            if measured:
                ref = self.reference_fn(self.budget)
                reward += e.metric_reward_weight * 10.0 * (m - ref) / max(abs(ref), 1e-12)
        else:
            reward = 0.0
            if measured:
                inc = self.anchors.get(self.budget)
                ref = inc.metric if inc is not None else self.reference_fn(self.budget)
                reward = e.metric_reward_weight * 10.0 * max(0.0, m - ref) / max(abs(ref), 1e-12)
                if m > ref:  # above the incumbent (or, with none yet, the DP plan)
                    self.anchors.offer(self.budget, Incumbent(
                        tuple(int(x) for x in self._u), tuple(tuple(int(x) for x in g)
                                                              for g in self._v),
                        float(m), float(err)))
        self.summary = EpisodeSummary(
            plan=plan, reward=float(reward), metric=float(m) if m is not None else math.nan,
            avg_bits=plan_avg_bits(plan, self.tables, self.cfg.cost), proxy_error=err,
            projections=self._projections, steps=self._steps)
        return float(reward)

    # -------------------------------------------------------------------------------------
    # Observation

    def _obs(self) -> np.ndarray:
        L = len(self.tables)
        l_ = min(self._l, L - 1)
        span = max(float(self.values[-1]), 1e-12)
        budget = [self.budget / 8.0, (self.budget - self.min_bits) / 8.0]
        group = np.zeros(2 + self.nz)
        decided = [0.0, 0.0]
        phase = 0.0
        anchor = [0.0]
        if self.anchors is not None and not self._done:
            base = (self._base_u[l_] if self._phase == "layer"
                    else self._base_v[l_][self._j])
            anchor = [self.values[base] / span]
        if self._phase == "group" and not self._done:
            gf = self.group_feats[l_][self._j]
            group = np.concatenate([[self._j / len(self.groups[l_])], gf])
            decided[0] = self.values[self._u[l_]] / span
            if self._j > 0:
                decided[1] = self.values[self._v[l_][self._j - 1]] / span
            phase = 1.0
        return self.layout.build(layer=self.static[l_], budget=budget, phase=[phase], group=group,
                                 decided=decided, anchor=anchor)
