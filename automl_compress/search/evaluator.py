"""The true-metric budget every search spends: counted, cached validation evaluations.

Searches (evo, spdy, the RL controllers, the choice of statistics corrections) score plans by the
task metric of the stitched, corrected model on the **validation** split, never on the test split
that is reported. Every score goes through one :class:`Evaluator`, which

- caches by plan (a plan seen again costs nothing) and by validation fraction;
- counts what was spent: ``calls`` (metric evaluations), ``samples`` (validation items scored) and
  ``evaluations``, the spend in full-validation-pass equivalents (``samples / val_size``): the unit
  of every budget (``--evaluations N``), so a search that scores candidates on a quarter of the
  split first (EvoPress-style multi-stage selection) pays a quarter;
- refuses to exceed its budget (:class:`BudgetSpent`).
"""

from __future__ import annotations

from collections.abc import Callable
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
        return {"evaluations": self.evaluations, "metric_calls": self.calls,
                "forward_samples": self.samples}


class Evaluator:
    """Scores plans on the validation split, with a cache and a budget.

    Args:
        score: ``(plan, fraction) -> metric`` on the first ``fraction`` of the validation split.
        items: ``fraction -> validation items scored`` (``items(1.0)`` = the split's size).
        budget: the most full-pass equivalents to spend (None: unlimited).
    """

    def __init__(self, score: Callable[[CompressionPlan, float], float],
                 items: Callable[[float], int], budget: float | None = None) -> None:
        self.score, self.items, self.budget = score, items, budget
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

    def affordable(self, fraction: float = 1.0) -> bool:
        """Whether one more score at ``fraction`` fits the budget."""
        return self.budget is None or self.spent + self.cost(fraction) <= self.budget + 1e-9

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

    def spend(self) -> Spend:
        """The spend so far."""
        return Spend(self.spent, self.calls, self.samples)
