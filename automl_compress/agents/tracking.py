"""What the controllers' training sees of the outside: the metered metric, and every episode.

- :class:`MetricOracle`: the controllers' access to the validation metric through the counting
  :class:`~automl_compress.search.Evaluator`: every ``env.metric_every``-th new plan is scored on
  the first ``agent.metric_fraction`` of the split while the evaluation budget allows (keeping
  enough for the final candidates); when the budget is spent training stops.
- :class:`Tracker`: the env's episode hook. It writes TensorBoard scalars, the allocation image
  every ``IMAGE_EVERY`` episodes, and keeps per budget a pool of the best-scoring plans
  (:class:`Best`), saved with the run's checkpoints and restored on resume.

The training loop that uses them is :class:`~automl_compress.agents.hierarchical.Search`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from automl_compress.agents.callbacks import Progress
from automl_compress.database.tables import LayerTable
from automl_compress.envs import EpisodeSummary
from automl_compress.logs import SearchWriter
from automl_compress.plan import CompressionPlan
from automl_compress.search.evaluator import Evaluator

IMAGE_EVERY = 50


class MetricOracle:
    """The controllers' access to the validation metric: scheduled, partial, budgeted, counted.

    Args:
        evaluator: the counting, caching validation scorer.
        every: score every this many new plans (1 = every episode).
        fraction: the share of the validation split a training episode is scored on.
        reserve: full validation passes kept back for the final candidates, or a function
            giving them (asked whenever the room for one more score is checked).
        budget: the run's budget: :attr:`by_budget` books there the plans whose meta names none.
    """

    def __init__(self, evaluator: Evaluator, every: int = 1, fraction: float = 1.0,
                 reserve: float | Callable[[], float] = 0.0, budget: float = math.nan) -> None:
        self.evaluator, self.every = evaluator, int(every)
        self.fraction = float(fraction)
        self.reserve = reserve if callable(reserve) else float(reserve)
        self.calls = 0
        self.force = False
        self.exhausted = False
        self.budget = float(budget)
        #: full validation passes spent through this oracle, by the scored plan's budget
        self.by_budget: dict[float, float] = {}

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
        if b is None:
            return True
        reserve = self.reserve() if callable(self.reserve) else self.reserve
        return self.evaluator.spent + self.evaluator.cost(fraction) <= b - reserve + 1e-9

    def __call__(self, plan: CompressionPlan) -> float | None:
        """A training episode's score on ``fraction`` of the split.

        None when not scheduled (or, with ``force``, the score on the whole split).
        """
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
        return self._score(plan, frac)

    def measure(self, plan: CompressionPlan, fraction: float = 1.0) -> float | None:
        """Score a plan now (final candidates, references); None when the budget is spent."""
        known = self.evaluator.known(plan, fraction)
        if known is not None:
            return known
        if not self.evaluator.affordable(fraction):
            return None
        return self._score(plan, fraction)

    def measure_many(self, plans: list[CompressionPlan],
                     fraction: float = 1.0) -> list[float | None]:
        """:meth:`measure` of each plan, in order, the new ones scored as one batch.

        The batch runs in parallel on a Ray executor; the values and counts are the same as
        measuring the plans one by one.
        """
        before = self.evaluator.spent
        values: list[float | None] = list(self.evaluator.many(plans, fraction))
        for p, after in zip(plans, self.evaluator.spent_after, strict=False):
            self._book(p, after - before)
            before = after
        return values + [self.measure(p, fraction) for p in plans[len(values):]]

    def _score(self, plan: CompressionPlan, fraction: float) -> float:
        before = self.evaluator.spent
        value = self.evaluator(plan, fraction)
        self._book(plan, self.evaluator.spent - before)
        return value

    def _book(self, plan: CompressionPlan, spent: float) -> None:
        if spent > 0:
            b = _budget_of(plan, self.budget)
            self.by_budget[b] = self.by_budget.get(b, 0.0) + spent


@dataclass
class Best:
    """The best plan so far."""

    plan: CompressionPlan
    metric: float
    proxy_error: float
    avg_bits: float
    episode: int

    def key(self) -> tuple[bool, float, float]:
        """Sort key: finite metric first, then higher metric, then lower proxy error."""
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
        """Log one episode and keep its plan in its budget's pool if it ranks there."""
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
        """The episode count and the pools, as JSON-ready data for a checkpoint."""
        return {"episodes": self.episodes, "pools": {str(b): [{
            "plan": x.plan.to_dict(), "metric": x.metric, "proxy_error": x.proxy_error,
            "avg_bits": x.avg_bits, "episode": x.episode} for x in pool]
            for b, pool in self.pools.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        """Set the episode count and the pools back from :meth:`state`'s data."""
        self.episodes = int(state.get("episodes", 0))
        self.pools = {float(b): [Best(CompressionPlan.from_dict(x["plan"]), float(x["metric"]),
                                      float(x["proxy_error"]), float(x["avg_bits"]),
                                      int(x["episode"])) for x in pool]
                      for b, pool in state.get("pools", {}).items()}
