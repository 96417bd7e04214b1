"""The worked examples in the solver docstrings run and give what they say."""

import doctest
import importlib

import pytest

MODULES = ["chita", "exact_obs", "gptq", "obq", "registry"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(f"automl_compress.solvers.{name}")
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
