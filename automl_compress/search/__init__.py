"""True-metric searches over the layer database: EvoPress-style evolution and SPDY.

Both start from the calibrated DP plan, score candidates on the validation split through one
counting :class:`~automl_compress.search.evaluator.Evaluator`, and never return a plan that scores
worse than that start on the validation split.
"""

from automl_compress.search.evaluator import BudgetSpent, Evaluator, Spend
from automl_compress.search.evo import evo_search
from automl_compress.search.result import SearchResult
from automl_compress.search.spdy import spdy_search

__all__ = ["BudgetSpent", "Evaluator", "SearchResult", "Spend", "evo_search", "spdy_search"]
