"""The agents tests reuse the env tests' synthesised tables (tests/envs/conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

_ENVS = str(Path(__file__).resolve().parents[1] / "envs")
if _ENVS not in sys.path:
    sys.path.insert(0, _ENVS)
_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
