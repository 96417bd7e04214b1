"""The true-metric budget every search spends: counted, cached validation evaluations.

Searches (evo, spdy, the RL controllers, the choice of objective and statistics corrections)
score plans by the task metric of the stitched, corrected model on the **validation** split, never
on the test split that is reported. Every score goes through one :class:`Evaluator`, which

- caches by plan (a plan seen again costs nothing) and by validation fraction;
- counts what was spent: ``calls`` (metric evaluations), ``samples`` (validation items scored) and
  ``evaluations``, the spend in full-validation-pass equivalents (``samples / val_size``): the unit
  of every budget (``--evaluations N``), so a search that scores candidates on a quarter of the
  split first (EvoPress-style multi-stage selection) pays a quarter;
- refuses to exceed its budget (:class:`BudgetSpent`).

:meth:`Evaluator.many` scores a batch of plans at once (evo's offspring of a stage, SPDY's
candidates, the RL's final candidates): with a ``score_many`` (a pool of Ray actors,
automl_compress/executors.py) the new plans of the batch are scored in parallel, and the cache, the
counts and the budget come out exactly as scoring them one by one in order would leave them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from automl_compress.plan import CompressionPlan


class BudgetSpent(Exception):
    """Raised by :meth:`Evaluator.__call__` when a score would exceed the evaluation budget."""


@dataclass(frozen=True)
class Spend:
    """What a search spent. ``evaluations`` is in full-validation-pass equivalents."""

    evaluations: float
    calls: int
    samples: int

    def as_dict(self) -> dict[str, float]:
        """The spend as ``{evaluations, metric_calls, forward_samples}``."""
        return {"evaluations": self.evaluations, "metric_calls": self.calls,
                "forward_samples": self.samples}


class Evaluator:
    """Scores plans on the validation split, with a cache and a budget.

    Args:
        score: ``(plan, fraction) -> metric`` on the first ``fraction`` of the validation split.
        items: ``fraction -> validation items scored`` (``items(1.0)`` = the split's size).
        budget: the most full-pass equivalents to spend (None: unlimited).
        score_many: ``(plans, fraction) -> metrics`` scoring several plans at once (in parallel);
            None: :meth:`many` calls ``score`` on each in turn.
    """

    def __init__(self, score: Callable[[CompressionPlan, float], float],
                 items: Callable[[float], int], budget: float | None = None,
                 score_many: Callable[[Sequence[CompressionPlan], float], Sequence[float]]
                 | None = None) -> None:
        self.score, self.items, self.budget = score, items, budget
        self.score_many = score_many
        self.spent_after: list[float] = []
        self.cache: dict[tuple, float] = {}
        self.calls = 0
        self.samples = 0
        self._size: int | None = None

    @property
    def size(self) -> int:
        """Validation items in a full pass."""
        if self._size is None:
            self._size = max(int(self.items(1.0)), 1)
        return self._size

    @property
    def spent(self) -> float:
        """Full-pass equivalents spent so far."""
        return self.samples / self.size if self.samples else 0.0

    def cost(self, fraction: float = 1.0) -> float:
        """What one score at ``fraction`` costs, in full-pass equivalents."""
        return self.items(fraction) / self.size

    def affordable(self, fraction: float = 1.0, samples: int | None = None) -> bool:
        """Whether one more score at ``fraction`` fits the budget.

        Counted after ``samples`` validation items (default: those spent so far).
        """
        s = self.samples if samples is None else samples
        spent = s / self.size if s else 0.0
        return self.budget is None or spent + self.cost(fraction) <= self.budget + 1e-9

    def known(self, plan: CompressionPlan, fraction: float = 1.0) -> float | None:
        """The cached score of a plan at ``fraction``, or None."""
        return self.cache.get((plan.key(), fraction))

    def __call__(self, plan: CompressionPlan, fraction: float = 1.0) -> float:
        """The plan's validation metric on the first ``fraction`` of the split.

        Raises:
            BudgetSpent: scoring it would exceed the budget (nothing is spent).
        """
        key = (plan.key(), fraction)
        if key in self.cache:
            return self.cache[key]
        if not self.affordable(fraction):
            raise BudgetSpent(f"{self.spent:.2f} of {self.budget} evaluations spent")
        value = float(self.score(plan, fraction))
        self.calls += 1
        self.samples += self.items(fraction)
        self.cache[key] = value
        return value

    def many(self, plans: Sequence[CompressionPlan], fraction: float = 1.0) -> list[float]:
        """The scores of ``plans`` at ``fraction``, the new ones scored together.

        The same scores as ``[self(p, fraction) for p in plans]`` would give.

        A plan already cached, or earlier in the batch, costs nothing. Where scoring one more
        plan would exceed the budget the batch stops: the scores before that plan are returned
        (a shorter list) and counted, exactly what the one-by-one loop spends before it raises
        :class:`BudgetSpent`.

        Returns:
            One score per plan of the longest prefix of ``plans`` that fits the budget;
            ``self.spent_after`` holds what had been spent after each of them, one by one.
        """
        new: list[CompressionPlan] = []
        keys: set[tuple] = set()
        samples, fits = self.samples, len(plans)
        self.spent_after = []
        for i, plan in enumerate(plans):
            key = (plan.key(), fraction)
            if key not in self.cache and key not in keys:
                if not self.affordable(fraction, samples):
                    fits = i
                    break
                new.append(plan)
                keys.add(key)
                samples += self.items(fraction)
            self.spent_after.append(samples / self.size if samples else 0.0)
        if len(new) > 1 and self.score_many is not None:
            values = [float(v) for v in self.score_many(new, fraction)]
        else:
            values = [float(self.score(p, fraction)) for p in new]
        for plan, value in zip(new, values, strict=True):
            self.calls += 1
            self.samples += self.items(fraction)
            self.cache[(plan.key(), fraction)] = value
        return [self.cache[(p.key(), fraction)] for p in plans[:fits]]

    def spend(self) -> Spend:
        """The spend so far."""
        return Spend(self.spent, self.calls, self.samples)
