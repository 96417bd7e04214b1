"""What a true-metric search returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from automl_compress.plan import CompressionPlan
from automl_compress.search.evaluator import Spend


@dataclass(frozen=True)
class SearchResult:
    """The best plan a search found, its validation metric, and what the search spent.

    Attributes:
        plan: the best plan (within budget).
        metric_val: its metric on the whole validation split.
        start_val: the warm start's metric on the whole validation split.
        spend: evaluations, metric calls and validation samples spent (warm start included).
        history: (evaluations spent, best validation metric so far) after every improvement.
        coefficients: spdy: the best plan's log10 layer coefficients ``u``
            (:func:`~automl_compress.search.spdy.coefficient_plan` re-plans them at any budget);
            None for the other searches.
    """

    plan: CompressionPlan
    metric_val: float
    start_val: float
    spend: Spend
    history: list[tuple[float, float]] = field(default_factory=list)
    coefficients: tuple[float, ...] | None = None
