"""LayerTable: option costs read once per cost config."""

from __future__ import annotations

import numpy as np
import pytest
from _random_tables import random_table

from automl_compress.config import CostConfig
from automl_compress.database.costs import row_bits


def test_option_bits_are_computed_once_per_cost_and_read_only():
    t = random_table(rows=4, cols=16, seed=0)
    for cost in (None, CostConfig(), CostConfig(scale_bits=8, zero_bits=0)):
        ob = t.option_bits(cost)
        want = [[row_bits(16, b, p, cost) for b in t.bits] for p in t.patterns]
        assert ob.tolist() == want
        assert t.option_bits(cost) is ob
        with pytest.raises(ValueError):
            ob[0, 0] = 1.0
    assert not np.array_equal(t.option_bits(CostConfig()),
                              t.option_bits(CostConfig(scale_bits=8, zero_bits=0)))
