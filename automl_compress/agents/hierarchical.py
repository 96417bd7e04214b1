"""The orchestrator: the training loop of the controllers, and the final plan.

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

The true metric is the validation split's, through
:class:`~automl_compress.agents.tracking.MetricOracle` (scheduled, partial, budgeted, counted);
when its budget is spent training stops. Every finished episode goes through
:class:`~automl_compress.agents.tracking.Tracker` (TensorBoard, and per budget a pool of the
best-scoring plans); both live in :mod:`automl_compress.agents.tracking` and are importable from
here.

The final plan (:meth:`Search.finalize`) is the best on the whole validation split among the
deterministic rollout of the final policies, the pool's best plans (or sampled rollouts), and the
calibrated DP plan, so it never scores below the calibrated DP on validation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.monitor import Monitor

from automl_compress.agents import controllers
from automl_compress.agents.callbacks import Progress, StepCallback
from automl_compress.agents.policies import CHANNEL_POLICIES, LAYER_POLICIES
from automl_compress.agents.tracking import Best, MetricOracle, Tracker
from automl_compress.agents.transfer import controller_names
from automl_compress.config import Config
from automl_compress.database.allocate import allocate_dp, plan_avg_bits, plan_error
from automl_compress.database.tables import LayerTable
from automl_compress.envs import CompressionEnv, EpisodeSummary
from automl_compress.envs.coef_env import NEUTRAL, Anchors, CoefficientEnv
from automl_compress.envs.haq_env import HAQEnv
from automl_compress.errors import ConfigError
from automl_compress.logs import SearchWriter, sb3_logger
from automl_compress.plan import CompressionPlan
from automl_compress.search.evaluator import Evaluator


def _decisions(env: CoefficientEnv, name: str) -> int:
    """Controller ``name``'s decisions in one episode of ``env``: a layer's, or every group's."""
    return len(env.tables) if name == "layer_controller" else sum(len(g) for g in env.groups)


class Search:
    """Builds the envs and SB3 models of one configuration over one model's tables.

    Args:
        tables: layer tables in forward order (objective-weighted).
        cfg: the resolved config.
        metric_fn: ``plan -> metric``; used when no ``evaluator`` is given (every score then
            counts one evaluation); None: no metric, the best plan is by proxy error.
        metric_dense: the dense model's validation metric (the budget form's reward reference,
            the target of the coefficient form's 'gap' budget draw).
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
        self.coefficient = a.coefficient_form
        every = 1 if self.coefficient else cfg.env.metric_every
        self._dp_plans: dict[float, CompressionPlan] = {}
        self.oracle = None if evaluator is None else MetricOracle(
            evaluator, every, a.metric_fraction, reserve=self._final_reserve,
            budget=cfg.env.budget_bits)
        self.writer = SearchWriter(tb_dir, purge_step) if tb_dir is not None else None
        self.tb_dir = tb_dir
        self.tracker = Tracker(self.tables, self.writer, self.progress, cfg.env.budget_bits)
        self.anchors = Anchors()  # the incumbents of env.coef_anchor='best', shared by the envs
        self.metric_dense = metric_dense
        self.names = controller_names(cfg)
        self.refs = {n: controllers.PolicyRef() for n in ("layer_controller",
                                                          "channel_controller")}
        self.envs = {n: self._make_env(n) for n in self.names}
        models = models or {}
        self._fresh = not models  # new controllers: a run that starts, not a fine-tune
        self.models: dict[str, Any] = {}
        for i, n in enumerate(self.names):
            if n in models:
                m = models[n]
                m.set_env(self.envs[n])
            elif n == "haq":
                m = controllers.make_ddpg(self.envs[n], cfg.agent, cfg.seed + i)
            else:
                m = controllers.make_ppo(self.envs[n], cfg, cfg.seed + i)
                if self.coefficient:
                    controllers.favour_action(m, self._reference_env().neutral,
                                              self._initial_bonus(n))
            m.set_logger(sb3_logger(tb_dir, n))
            self.models[n] = m
            if n in self.refs:
                self.refs[n].model = m

    def _initial_bonus(self, name: str) -> float:
        """A new coefficient controller's logit bonus on the neutral action (docs/env.md §4).

        Set so that the controller moves ``agent.layer_moves`` (layer controller) or
        ``agent.channel_moves`` (channel controller, over every group of the episode) of its
        decisions on average, whatever the model's size; ``agent.neutral_prior`` where that
        setting is None.
        """
        a = self.cfg.agent
        moves = a.layer_moves if name == "layer_controller" else a.channel_moves
        if moves is None:
            return a.neutral_prior
        return controllers.moves_bonus(_decisions(self._reference_env(), name),
                                       self.cfg.env.coef_levels, moves)

    # ---------------------------------------------------------------------------------------

    def reference(self, budget: float) -> float:
        """The calibrated DP plan's score at ``budget`` on the training fraction.

        It is the coefficient form's reward reference, counted like any score.
        """
        assert self.oracle is not None
        v = self.oracle.measure(self.dp_plan(budget), self.oracle.fraction)
        return float(v) if v is not None else self.metric_dense

    def known_reference(self, budget: float) -> float | None:
        """:meth:`reference` where it was already measured, else None (nothing is spent)."""
        assert self.oracle is not None
        return self.oracle.evaluator.known(self.dp_plan(budget), self.oracle.fraction)

    def _final_reserve(self) -> float:
        """Full passes :meth:`finalize` may still spend: its candidates not yet scored in full.

        The deterministic rollout is counted as new; the pool's plans and the DP plan are free
        once scored on the whole split (``agent.metric_fraction = 1``); each missing pool entry
        is a sampled rollout.
        """
        assert self.oracle is not None
        fc = self.cfg.agent.final_candidates
        budget = self.cfg.env.budget_bits
        pool = self.tracker.pools.get(round(budget, 6), [])[: fc - 1]
        known = self.oracle.evaluator.known
        new = 1 + sum(known(x.plan) is None for x in pool) + (fc - 1 - len(pool))
        return float(new + (known(self.dp_plan(budget)) is None))

    def dp_plan(self, budget: float) -> CompressionPlan:
        """The calibrated DP plan at ``budget`` (as the controllers' neutral action gives it)."""
        key = round(budget, 6)
        if key not in self._dp_plans:
            self._dp_plans[key] = self._dp_plan(budget)
        return self._dp_plans[key]

    def _dp_plan(self, budget: float) -> CompressionPlan:
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

    def _make_raw_env(self, name: str, anchors: Anchors | None = None) -> Any:
        """The env controller ``name`` trains in.

        Coefficient form: on ``anchors`` (default: the search's own incumbents).
        """
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
                episode_hook=self.tracker, budgets=self.cfg.env.budgets(),
                anchors=self.anchors if anchors is None else anchors,
                metric_dense=self.metric_dense if oracle is not None else None,
                known_reference=self.known_reference if oracle is not None else None)
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
        """Train the controllers (in turns) until ``progress.steps`` reaches ``total_steps``.

        Training also stops earlier when the evaluation budget is spent.
        """
        cb = StepCallback(self.progress, self.cfg.agent.checkpoint_every, checkpoint,
                          stop=self.exhausted)
        if self._fresh and self.progress.steps == 0:
            self.warm_up(self.cfg.agent.warmup_episodes)
        for name, n in self.schedule(self.progress.steps, total_steps):
            target = self.progress.steps + n
            while self.progress.steps < target and not self.exhausted():
                self.models[name].learn(total_timesteps=target - self.progress.steps,
                                        reset_num_timesteps=False, callback=cb,
                                        progress_bar=False)
            if self.writer is not None and name in self.coefficient_controllers():
                self.writer.moves(self.progress.steps, name, self.expected_moves(name))
            if checkpoint is not None:
                checkpoint()
            if self.exhausted():
                break

    def coefficient_controllers(self) -> list[str]:
        """The learned coefficient-form controllers (those :meth:`expected_moves` reads)."""
        if not self.coefficient:
            return []
        return [n for n in ("layer_controller", "channel_controller") if n in self.models]

    def expected_moves(self, name: str, budget: float | None = None) -> float:
        """How many of controller ``name``'s decisions move away from the incumbent an episode.

        The sum over its decisions of 1 − P(neutral action) under its current (sampling) policy,
        along the episode that keeps the incumbent at ``budget`` (default: the run's); the
        partner controller acts deterministically, as in training. A new controller gives about
        ``agent.layer_moves`` or ``agent.channel_moves``. Nothing is scored.

        Raises:
            ConfigError: ``name`` is not a learned coefficient-form controller of this search.
        """
        import torch

        if name not in self.coefficient_controllers():
            raise ConfigError(f"expected_moves reads a learned coefficient-form controller "
                              f"({self.coefficient_controllers()}), found {name!r} (agent.form="
                              f"{self.cfg.agent.form!r}, agent.action={self.cfg.agent.action!r})")
        env = self._make_raw_env(name, Anchors(dict(self.anchors.best)))
        env.metric_fn, env.episode_hook = None, None
        model = self.models[name]
        budget = self.cfg.env.budget_bits if budget is None else budget
        obs, _ = env.reset(seed=self.cfg.seed, options={"budget": budget})
        decisions = _decisions(env, name)
        total = 0.0
        with torch.no_grad():
            for i in range(decisions):
                dist = model.policy.get_distribution(model.policy.obs_to_tensor(obs)[0],
                                                     action_masks=env.action_masks())
                total += 1.0 - float(dist.distribution.probs.reshape(-1)[env.neutral])
                if i + 1 < decisions:  # the last step would build the plan: not needed
                    obs, _, _, _, _ = env.step(env.neutral)
        return total

    def warm_up(self, episodes: int) -> None:
        """``episodes`` layer-controller episodes of uniformly random allowed actions.

        Coefficient form with a learned layer controller only. From the DP plan (the incumbent
        until an episode scores higher) a uniform action is a uniform level on the ladder for
        every layer: SPDY's random starting vectors. The episodes go through the same env as
        training (scored, tracked, the incumbent moved when one scores higher) and count as
        steps; no model learns from them.
        """
        if not self.coefficient or "layer_controller" not in self.models or episodes < 1:
            return
        env = self._make_raw_env("layer_controller")
        rng = np.random.default_rng(self.cfg.seed)
        for i in range(episodes):
            if self.exhausted():
                return
            env.reset(seed=self.cfg.seed + i)
            done = False
            while not done:
                action = int(rng.choice(np.flatnonzero(env.action_masks())))
                _, _, done, _, _ = env.step(action)
                self.progress.advance()

    # ---------------------------------------------------------------------------------------

    def rollout(self, deterministic: bool = True, budget: float | None = None,
                measure: bool = True) -> EpisodeSummary:
        """One episode of the current policies at ``budget`` (default: the run's).

        Its plan is scored on the whole validation split when ``measure``.
        """
        name = self.names[0]
        # a rollout starts from the incumbents but never moves them: its score may be on the
        # whole split, theirs are on the training fraction
        env = self._make_raw_env(name, Anchors(dict(self.anchors.best)))
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
        """The run's plan at ``budget`` (default: the run's).

        It is the best on the whole validation split among the deterministic rollout, the pool's
        best (or sampled rollouts), and the calibrated DP plan.
        """
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
        """Close the TensorBoard writer and the controllers' loggers."""
        if self.writer is not None:
            self.writer.close()
        for m in self.models.values():
            m.logger.close()
