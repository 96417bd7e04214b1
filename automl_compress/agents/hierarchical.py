"""The orchestrator: trains the controllers together and keeps the best plan.

Forms (``agent.form``; docs/env.md):

- ``hierarchical``: two ordinary MaskablePPO models. The layer model trains in the ``layer`` env
  where the channel model acts frozen (deterministic, masked) inside ``step``; then the channel
  model trains in the ``channel`` env where the layer model acts frozen; turns alternate every
  ``agent.round_steps`` env steps. Both see every episode's outcome. ``agent.action`` says what
  they decide: 'budget' (envs/compression_env.py) or 'coefficient' (envs/coef_env.py: the
  calibrated DP's per-layer and per-group coefficients). Ablations: ``channel_controller`` =
  'knapsack' (or 'uniform', budget action only) replaces the channel model by the exact per-row
  knapsack; ``layer_controller`` = 'dp' takes the calibrated DP's layer decisions.
- ``flat``: one MaskablePPO on the two-phase episode (a layer step, then its group steps).
- ``haq``: the HAQ-style DDPG baseline (``envs/haq_env.py``).

The true metric is the validation split's, through :class:`MetricOracle` and its counting
:class:`~automl_compress.search.Evaluator`: every ``env.metric_every``-th new plan is scored on
the first ``agent.metric_fraction`` of the split while the evaluation budget allows (keeping
enough for the final candidates); when the budget is spent training stops.

Every finished episode goes through :class:`Tracker`: TensorBoard scalars, the allocation image
every ``IMAGE_EVERY`` episodes, and per budget a pool of the best-scoring plans. The final plan
(:meth:`Search.finalize`) is the best on the whole validation split among the deterministic
rollout of the final policies, the pool's best plans (or sampled rollouts), and the calibrated DP
plan, so it never scores below the calibrated DP on validation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stable_baselines3.common.monitor import Monitor

from automl_compress.agents import controllers
from automl_compress.agents.callbacks import Progress, StepCallback
from automl_compress.agents.policies import CHANNEL_POLICIES, LAYER_POLICIES
from automl_compress.agents.transfer import controller_names
from automl_compress.config import Config
from automl_compress.database.allocate import allocate_dp, plan_avg_bits, plan_error
from automl_compress.database.tables import LayerTable
from automl_compress.envs import CompressionEnv, EpisodeSummary
from automl_compress.envs.coef_env import NEUTRAL, CoefficientEnv
from automl_compress.envs.haq_env import HAQEnv
from automl_compress.logs import SearchWriter, sb3_logger
from automl_compress.plan import CompressionPlan
from automl_compress.search.evaluator import Evaluator

IMAGE_EVERY = 50


class MetricOracle:
    """The controllers' access to the validation metric: scheduled, partial, budgeted, counted.

    Args:
        evaluator: the counting, caching validation scorer.
        every: score every this many new plans (1 = every episode).
        fraction: the share of the validation split a training episode is scored on.
        reserve: full validation passes kept back for the final candidates.
    """

    def __init__(self, evaluator: Evaluator, every: int = 1, fraction: float = 1.0,
                 reserve: float = 0.0) -> None:
        self.evaluator, self.every = evaluator, int(every)
        self.fraction, self.reserve = float(fraction), float(reserve)
        self.calls = 0
        self.force = False
        self.exhausted = False

    @property
    def evaluations(self) -> float:
        """Full validation passes spent so far."""
        return self.evaluator.spent

    @property
    def samples(self) -> int:
        """Validation items scored so far."""
        return self.evaluator.samples

    def _room(self, fraction: float) -> bool:
        b = self.evaluator.budget
        return b is None or self.evaluator.spent + self.evaluator.cost(fraction) \
            <= b - self.reserve + 1e-9

    def __call__(self, plan: CompressionPlan) -> float | None:
        """A training episode's score on ``fraction`` of the split, or None when not scheduled
        (or, with ``force``, the whole split)."""
        frac = 1.0 if self.force else self.fraction
        known = self.evaluator.known(plan, frac)
        if known is not None:
            return known
        if self.force:
            return self.measure(plan)
        self.calls += 1
        if (self.calls - 1) % self.every:
            return None
        if not self._room(frac):
            self.exhausted = True
            return None
        return self.evaluator(plan, frac)

    def measure(self, plan: CompressionPlan, fraction: float = 1.0) -> float | None:
        """Score a plan now (final candidates, references); None when the budget is spent."""
        known = self.evaluator.known(plan, fraction)
        if known is not None:
            return known
        if not self.evaluator.affordable(fraction):
            return None
        return self.evaluator(plan, fraction)

    def measure_many(self, plans: list[CompressionPlan],
                     fraction: float = 1.0) -> list[float | None]:
        """:meth:`measure` of each plan, in order, the new ones scored as one batch (in parallel
        on a Ray executor); the same values and counts as measuring them one by one."""
        values: list[float | None] = list(self.evaluator.many(plans, fraction))
        return values + [self.measure(p, fraction) for p in plans[len(values):]]


@dataclass
class Best:
    """The best plan so far."""

    plan: CompressionPlan
    metric: float
    proxy_error: float
    avg_bits: float
    episode: int

    def key(self) -> tuple[bool, float, float]:
        return (math.isfinite(self.metric), self.metric if math.isfinite(self.metric) else 0.0,
                -self.proxy_error)


def _budget_of(plan: CompressionPlan, default: float) -> float:
    return round(float(plan.meta.get("budget_bits", default)), 6)


@dataclass
class Tracker:
    """Episode hook: logs every episode and keeps, per budget, the best-scoring plans.

    Args:
        tables: the layer tables (for images and tables).
        writer: the TensorBoard ``search`` run (None: no logging).
        progress: the shared step counter (the TensorBoard x axis).
        budget: the run's budget (episodes without one in their plan's meta count there).
        pool_size: plans kept per budget.
    """

    tables: Sequence[LayerTable]
    writer: SearchWriter | None
    progress: Progress
    budget: float
    pool_size: int = 4
    episodes: int = 0
    pools: dict[float, list[Best]] = field(default_factory=dict)

    @property
    def best(self) -> Best | None:
        """The best-scoring plan at the run's budget (training scores may be partial)."""
        pool = self.pools.get(round(self.budget, 6), [])
        return pool[0] if pool else None

    def __call__(self, s: EpisodeSummary) -> None:
        self.episodes += 1
        step = self.progress.steps
        w = self.writer
        if w is not None:
            w.episode(step, s.reward, s.metric, s.avg_bits, s.proxy_error, s.projections)
            if self.episodes % IMAGE_EVERY == 1:
                w.allocation(step, s.plan, self.tables, f"episode {self.episodes}")
        b = _budget_of(s.plan, self.budget)
        pool = self.pools.setdefault(b, [])
        cand = Best(s.plan, s.metric, s.proxy_error, s.avg_bits, self.episodes)
        same = [k for k, p in enumerate(pool) if p.plan.key() == s.plan.key()]
        if same:  # seen before: keep the better-scored entry (a later score may be full)
            if cand.key() <= pool[same[0]].key():
                return
            pool.pop(same[0])
        top = pool[0] if pool else None
        pool.append(cand)
        pool.sort(key=lambda x: x.key(), reverse=True)
        del pool[self.pool_size:]
        if pool[0] is cand and (top is None or cand.key() > top.key()) and \
                b == round(self.budget, 6):
            self.progress.best(s.metric)
            if w is not None:
                if math.isfinite(s.metric):
                    w.best(step, s.metric)
                w.best_plan(step, s.plan, self.tables)
                w.allocation(step, s.plan, self.tables, f"best (episode {self.episodes})")

    def state(self) -> dict[str, Any]:
        return {"episodes": self.episodes, "pools": {str(b): [{
            "plan": x.plan.to_dict(), "metric": x.metric, "proxy_error": x.proxy_error,
            "avg_bits": x.avg_bits, "episode": x.episode} for x in pool]
            for b, pool in self.pools.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        self.episodes = int(state.get("episodes", 0))
        self.pools = {float(b): [Best(CompressionPlan.from_dict(x["plan"]), float(x["metric"]),
                                      float(x["proxy_error"]), float(x["avg_bits"]),
                                      int(x["episode"])) for x in pool]
                      for b, pool in state.get("pools", {}).items()}


class Search:
    """Builds the envs and SB3 models of one configuration over one model's tables.

    Args:
        tables: layer tables in forward order (objective-weighted).
        cfg: the resolved config.
        metric_fn: ``plan -> metric``; used when no ``evaluator`` is given (every score then
            counts one evaluation); None: no metric, the best plan is by proxy error.
        metric_dense: the dense model's metric (the budget form's reward reference).
        tb_dir: TensorBoard folder (None: no logging).
        progress: the shared step counter.
        models: pre-loaded models by name (apply / resume); built fresh when absent.
        purge_step: on resume, TensorBoard events of the search run after this step are dropped.
        evaluator: the counting validation scorer (its budget ends training).

    Raises:
        InfeasibleBudgetError: the budget is below the feasible minimum.
    """

    def __init__(self, tables: Sequence[LayerTable], cfg: Config,
                 metric_fn: Callable[[CompressionPlan], float] | None = None,
                 metric_dense: float = 1.0, tb_dir: str | Path | None = None,
                 progress: Progress | None = None,
                 models: dict[str, Any] | None = None, purge_step: int | None = None,
                 evaluator: Evaluator | None = None) -> None:
        self.tables, self.cfg = list(tables), cfg
        self.progress = progress or Progress(cfg.agent.total_steps)
        if evaluator is None and metric_fn is not None:
            evaluator = Evaluator(lambda p, f: metric_fn(p), lambda f: 1)
        a = cfg.agent
        self.coefficient = a.form == "hierarchical" and a.action == "coefficient"
        every = 1 if self.coefficient else cfg.env.metric_every
        self.oracle = None if evaluator is None else MetricOracle(
            evaluator, every, a.metric_fraction, reserve=a.final_candidates + 1)
        self.writer = SearchWriter(tb_dir, purge_step) if tb_dir is not None else None
        self.tb_dir = tb_dir
        self.tracker = Tracker(self.tables, self.writer, self.progress, cfg.env.budget_bits)
        self.metric_dense = metric_dense
        self.names = controller_names(cfg)
        self.refs = {n: controllers.PolicyRef() for n in ("layer_controller",
                                                          "channel_controller")}
        self.envs = {n: self._make_env(n) for n in self.names}
        models = models or {}
        self.models: dict[str, Any] = {}
        for i, n in enumerate(self.names):
            if n in models:
                m = models[n]
                m.set_env(self.envs[n])
            elif n == "haq":
                m = controllers.make_ddpg(self.envs[n], cfg.agent, cfg.seed + i)
            else:
                m = controllers.make_ppo(self.envs[n], cfg.agent, cfg.seed + i)
                if self.coefficient:
                    controllers.favour_action(m, self._reference_env().neutral,
                                              cfg.agent.neutral_prior)
            if tb_dir is not None:
                m.set_logger(sb3_logger(tb_dir, n))
            self.models[n] = m
            if n in self.refs:
                self.refs[n].model = m

    # ---------------------------------------------------------------------------------------

    def reference(self, budget: float) -> float:
        """The calibrated DP plan's score at ``budget`` on the training fraction (the coefficient
        form's reward reference; counted like any score)."""
        assert self.oracle is not None
        v = self.oracle.measure(self.dp_plan(budget), self.oracle.fraction)
        return float(v) if v is not None else self.metric_dense

    def dp_plan(self, budget: float) -> CompressionPlan:
        """The calibrated DP plan at ``budget`` (as the controllers' neutral action gives it)."""
        if self.coefficient:
            env = self._reference_env()
            n = env.neutral
            return env.plan_for(budget, [n] * len(self.tables), [[n] * len(g) for g in
                                                                  env.groups])
        p = allocate_dp(self.tables, budget, self.cfg.cost)
        return CompressionPlan(p.layers, meta={"method": "rl", "budget_bits": budget})

    def _reference_env(self) -> CoefficientEnv:
        if not hasattr(self, "_ref_env"):
            self._ref_env = CoefficientEnv(self.tables, self.cfg,
                                           budgets=self.cfg.env.budgets())
        return self._ref_env

    def _env_kwargs(self) -> dict[str, Any]:
        return {"metric_fn": self.oracle, "metric_dense": self.metric_dense,
                "episode_hook": self.tracker}

    def _make_raw_env(self, name: str) -> Any:
        a = self.cfg.agent
        if self.coefficient:
            channel = self.refs["channel_controller"] if a.channel_controller == "learned" \
                else NEUTRAL
            layer = self.refs["layer_controller"] if a.layer_controller == "learned" \
                else NEUTRAL
            oracle = self.oracle
            return CoefficientEnv(
                self.tables, self.cfg, mode="layer" if name == "layer_controller" else "channel",
                layer_policy=layer, channel_policy=channel,
                metric_fn=(lambda p, b: oracle(p)) if oracle is not None else None,
                reference_fn=self.reference if oracle is not None else None,
                episode_hook=self.tracker, budgets=self.cfg.env.budgets())
        kw = self._env_kwargs()
        if name == "haq":
            return HAQEnv(self.tables, self.cfg, **kw)
        if name == "flat":
            return CompressionEnv(self.tables, self.cfg, mode="flat", **kw)
        if name == "layer_controller":
            channel = (self.refs["channel_controller"] if a.channel_controller == "learned"
                       else CHANNEL_POLICIES[a.channel_controller]())
            return CompressionEnv(self.tables, self.cfg, mode="layer", channel_policy=channel,
                                  **kw)
        layer = (self.refs["layer_controller"] if a.layer_controller == "learned"
                 else LAYER_POLICIES[a.layer_controller](self.tables, self.cfg))
        return CompressionEnv(self.tables, self.cfg, mode="channel", layer_policy=layer, **kw)

    def _make_env(self, name: str) -> Any:
        return Monitor(self._make_raw_env(name))

    # ---------------------------------------------------------------------------------------

    def schedule(self, done_steps: int, total_steps: int) -> list[tuple[str, int]]:
        """The (model, steps) turns from ``done_steps`` to ``total_steps``."""
        out, step = [], 0
        r = max(self.cfg.agent.round_steps, 1)
        turn = 0
        while step < total_steps:
            n = min(r, total_steps - step)
            lo, hi = step, step + n
            if hi > done_steps:
                out.append((self.names[turn % len(self.names)], hi - max(lo, done_steps)))
            step, turn = hi, turn + 1
        return out

    def exhausted(self) -> bool:
        """Whether the evaluation budget for training is spent."""
        return self.oracle is not None and self.oracle.exhausted

    def train(self, total_steps: int, checkpoint: Callable[[], None] | None = None) -> None:
        """Train the controllers (in turns) until ``progress.steps`` reaches ``total_steps`` or
        the evaluation budget is spent."""
        cb = StepCallback(self.progress, self.cfg.agent.checkpoint_every, checkpoint,
                          stop=self.exhausted)
        for name, n in self.schedule(self.progress.steps, total_steps):
            target = self.progress.steps + n
            while self.progress.steps < target and not self.exhausted():
                self.models[name].learn(total_timesteps=target - self.progress.steps,
                                        reset_num_timesteps=False, callback=cb,
                                        progress_bar=False)
            if checkpoint is not None:
                checkpoint()
            if self.exhausted():
                break

    # ---------------------------------------------------------------------------------------

    def rollout(self, deterministic: bool = True, budget: float | None = None,
                measure: bool = True) -> EpisodeSummary:
        """One episode of the current policies at ``budget`` (default: the run's); its plan is
        scored on the whole validation split when ``measure``."""
        name = self.names[0]
        env = self._make_raw_env(name)
        model = self.models[name]
        saved = (self.oracle.force, env.metric_fn) if self.oracle is not None else None
        if self.oracle is not None:
            self.oracle.force = True
            if not measure:
                env.metric_fn = None
        try:
            options = {"budget": budget} if budget is not None and self.coefficient else None
            obs, _ = env.reset(seed=self.cfg.seed, options=options)
            while True:
                if name == "haq":
                    action, _ = model.predict(obs, deterministic=deterministic)
                else:
                    action, _ = model.predict(obs, action_masks=env.action_masks(),
                                              deterministic=deterministic)
                obs, _, done, _, info = env.step(action)
                if done:
                    return info["compression"]
        finally:
            if saved is not None:
                self.oracle.force = saved[0]
                env.metric_fn = saved[1]

    def final_candidates(self) -> list[EpisodeSummary]:
        """``agent.final_candidates`` rollouts (first deterministic), all scored in full."""
        return [self.rollout(deterministic=(i == 0))
                for i in range(self.cfg.agent.final_candidates)]

    def finalize(self, budget: float | None = None) -> Best:
        """The run's plan at ``budget`` (default: the run's): the best on the whole validation
        split among the deterministic rollout, the pool's best (or sampled rollouts), and the
        calibrated DP plan."""
        budget = self.cfg.env.budget_bits if budget is None else budget
        cands: list[CompressionPlan] = [self.rollout(True, budget).plan]
        pool = self.tracker.pools.get(round(budget, 6), [])
        for x in pool[: self.cfg.agent.final_candidates - 1]:
            cands.append(x.plan)
        while len(cands) < self.cfg.agent.final_candidates:
            cands.append(self.rollout(False, budget).plan)
        if self.oracle is not None:
            cands.append(self.dp_plan(budget))
        best: Best | None = None
        scores = (self.oracle.measure_many(cands) if self.oracle is not None
                  else [None] * len(cands))
        for plan, m in zip(cands, scores, strict=True):
            value = float(m) if m is not None else math.nan
            b = Best(plan, value, plan_error(plan, self.tables),
                     plan_avg_bits(plan, self.tables, self.cfg.cost), self.tracker.episodes)
            if best is None or b.key() > best.key():
                best = b
        assert best is not None
        return best

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.tb_dir is not None:
            for m in self.models.values():
                m.logger.close()
