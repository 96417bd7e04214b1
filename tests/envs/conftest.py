"""Fixtures of the env tests: tables synthesised by ``synth.py`` beside this file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from synth import synth_tables  # noqa: E402


@pytest.fixture(scope="session")
def tables():
    return synth_tables(0)
