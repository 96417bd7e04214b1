"""Fixtures of the solver tests; the synthetic layers live in tests/_layers.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from _layers import Layer, make_layer, mixed_layer  # noqa: E402

__all__ = ["Layer", "make_layer", "mixed_layer"]


@pytest.fixture(name="make_layer")
def make_layer_fixture():
    """The :func:`make_layer` factory, for tests that need several layers."""
    return make_layer
