"""The orchestrator: trains the controllers together and keeps the best plan.

Forms (``agent.form``):

- ``hierarchical``: two ordinary MaskablePPO models. The layer model trains in the ``layer`` env
  where the channel model acts frozen (deterministic, masked) inside ``step``; then the channel
  model trains in the ``channel`` env where the layer model acts frozen; turns alternate every
  ``agent.round_steps`` env steps. Both see every episode's outcome (the end term of the reward).
  Ablations: ``channel_controller`` = 'knapsack' / 'uniform' replaces the channel model by the
  exact per-row knapsack / one width per layer (only the layer model trains);
  ``layer_controller`` = 'dp' takes layer budgets from the DP allocator (only the channel model
  trains).
- ``flat``: one MaskablePPO on the two-phase episode (a layer step, then its group steps).
- ``haq``: the HAQ-style DDPG baseline (``agents/haq.py``).

Every finished episode goes through :class:`Tracker`: TensorBoard scalars, the allocation image
every ``IMAGE_EVERY`` episodes, and the best plan so far (highest measured metric, ties → lower
proxy error; episodes whose metric was not measured never displace a measured one). The true
metric is measured by :class:`MetricOracle` every ``env.metric_every``-th episode, cached per
plan, and always for the final candidates (``agent.final_candidates`` rollouts of the final
policies: the first deterministic, the rest sampled).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stable_baselines3.common.monitor import Monitor

from automl_compress.agents import controllers, haq
from automl_compress.agents.callbacks import Progress, StepCallback
from automl_compress.agents.transfer import controller_names
from automl_compress.config import Config
from automl_compress.database.tables import LayerTable
from automl_compress.envs import CompressionEnv, EpisodeSummary
from automl_compress.logs import SearchWriter, sb3_logger
from automl_compress.plan import CompressionPlan

IMAGE_EVERY = 50
CACHE_SIZE = 4096


class MetricOracle:
    """Measures the true metric every ``every``-th new plan (cached), or always when ``force``.

    Args:
        fn: ``plan -> metric`` (the stitched, corrected model on the held-out split).
        every: measure every this many calls (1 = every episode).
    """

    def __init__(self, fn: Callable[[CompressionPlan], float], every: int = 1) -> None:
        self.fn, self.every = fn, int(every)
        self.calls = 0
        self.evaluations = 0
        self.samples = 0
        self.force = False
        self.cache: dict[tuple, float] = {}

    def __call__(self, plan: CompressionPlan) -> float | None:
        key = plan.key()
        if key in self.cache:
            return self.cache[key]
        self.calls += 1
        if not self.force and (self.calls - 1) % self.every:
            return None
        value = float(self.fn(plan))
        self.evaluations += 1
        if len(self.cache) >= CACHE_SIZE:
            self.cache.pop(next(iter(self.cache)))
        self.cache[key] = value
        return value


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


class Tracker:
    """Episode hook: logs every episode and keeps the best plan.

    Args:
        tables: the layer tables (for images and tables).
        writer: the TensorBoard ``search`` run (None: no logging).
        progress: the shared step counter (the TensorBoard x axis).
    """

    def __init__(self, tables: Sequence[LayerTable], writer: SearchWriter | None,
                 progress: Progress) -> None:
        self.tables, self.writer, self.progress = list(tables), writer, progress
        self.episodes = 0
        self.best: Best | None = None

    def __call__(self, s: EpisodeSummary) -> None:
        self.episodes += 1
        step = self.progress.steps
        w = self.writer
        if w is not None:
            w.episode(step, s.reward, s.metric, s.avg_bits, s.proxy_error, s.projections)
            if self.episodes % IMAGE_EVERY == 1:
                w.allocation(step, s.plan, self.tables, f"episode {self.episodes}")
        cand = Best(s.plan, s.metric, s.proxy_error, s.avg_bits, self.episodes)
        if self.best is None or cand.key() > self.best.key():
            self.best = cand
            self.progress.best(s.metric)
            if w is not None:
                if math.isfinite(s.metric):
                    w.best(step, s.metric)
                w.best_plan(step, s.plan, self.tables)
                w.allocation(step, s.plan, self.tables, f"best (episode {self.episodes})")

    def state(self) -> dict[str, Any]:
        b = self.best
        return {"episodes": self.episodes, "best": None if b is None else {
            "plan": b.plan.to_dict(), "metric": b.metric, "proxy_error": b.proxy_error,
            "avg_bits": b.avg_bits, "episode": b.episode}}

    def restore(self, state: dict[str, Any]) -> None:
        self.episodes = int(state.get("episodes", 0))
        b = state.get("best")
        if b:
            self.best = Best(CompressionPlan.from_dict(b["plan"]), float(b["metric"]),
                             float(b["proxy_error"]), float(b["avg_bits"]), int(b["episode"]))


class Search:
    """Builds the envs and SB3 models of one configuration over one model's tables.

    Args:
        tables: layer tables in forward order.
        cfg: the resolved config.
        metric_fn: ``plan -> metric`` (None: no end term, the best plan is by proxy error).
        metric_dense: the dense model's metric.
        tb_dir: TensorBoard folder (None: no logging).
        progress: the shared step counter.
        models: pre-loaded models by name (apply / resume); built fresh when absent.
        purge_step: on resume, TensorBoard events of the search run after this step are dropped.

    Raises:
        InfeasibleBudgetError: the budget is below the feasible minimum.
    """

    def __init__(self, tables: Sequence[LayerTable], cfg: Config,
                 metric_fn: Callable[[CompressionPlan], float] | None = None,
                 metric_dense: float = 1.0, tb_dir: str | Path | None = None,
                 progress: Progress | None = None,
                 models: dict[str, Any] | None = None, purge_step: int | None = None) -> None:
        self.tables, self.cfg = list(tables), cfg
        self.progress = progress or Progress(cfg.agent.total_steps)
        self.oracle = MetricOracle(metric_fn, cfg.env.metric_every) if metric_fn else None
        self.writer = SearchWriter(tb_dir, purge_step) if tb_dir is not None else None
        self.tb_dir = tb_dir
        self.tracker = Tracker(self.tables, self.writer, self.progress)
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
                m = haq.make_ddpg(self.envs[n], cfg.agent, cfg.seed + i)
            else:
                m = controllers.make_ppo(self.envs[n], cfg.agent, cfg.seed + i)
            if tb_dir is not None:
                m.set_logger(sb3_logger(tb_dir, n))
            self.models[n] = m
            if n in self.refs:
                self.refs[n].model = m

    # ---------------------------------------------------------------------------------------

    def _env_kwargs(self) -> dict[str, Any]:
        return {"metric_fn": self.oracle, "metric_dense": self.metric_dense,
                "episode_hook": self.tracker}

    def _make_raw_env(self, name: str) -> Any:
        a = self.cfg.agent
        kw = self._env_kwargs()
        if name == "haq":
            return haq.HAQEnv(self.tables, self.cfg, **kw)
        if name == "flat":
            return CompressionEnv(self.tables, self.cfg, mode="flat", **kw)
        channel = (self.refs["channel_controller"] if a.channel_controller == "learned"
                   else a.channel_controller)
        layer = self.refs["layer_controller"] if a.layer_controller == "learned" else "dp"
        if name == "layer_controller":
            return CompressionEnv(self.tables, self.cfg, mode="layer", channel_policy=channel,
                                  **kw)
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

    def train(self, total_steps: int, checkpoint: Callable[[], None] | None = None) -> None:
        """Train the controllers (in turns) until ``progress.steps`` reaches ``total_steps``."""
        cb = StepCallback(self.progress, self.cfg.agent.checkpoint_every, checkpoint)
        for name, n in self.schedule(self.progress.steps, total_steps):
            target = self.progress.steps + n
            while self.progress.steps < target:
                self.models[name].learn(total_timesteps=target - self.progress.steps,
                                        reset_num_timesteps=False, callback=cb,
                                        progress_bar=False)
            if checkpoint is not None:
                checkpoint()

    # ---------------------------------------------------------------------------------------

    def rollout(self, deterministic: bool = True) -> EpisodeSummary:
        """One episode of the current policies (the metric is always measured)."""
        name = self.names[0]
        env = self._make_raw_env(name)
        model = self.models[name]
        if self.oracle is not None:
            self.oracle.force = True
        try:
            obs, _ = env.reset(seed=self.cfg.seed)
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
            if self.oracle is not None:
                self.oracle.force = False

    def final_candidates(self) -> list[EpisodeSummary]:
        """``agent.final_candidates`` rollouts (first deterministic), all measured."""
        return [self.rollout(deterministic=(i == 0))
                for i in range(self.cfg.agent.final_candidates)]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.tb_dir is not None:
            for m in self.models.values():
                m.logger.close()
