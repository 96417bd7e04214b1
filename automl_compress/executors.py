"""Executors: where the database's layer solves and the searches' plan evaluations run.

``executor.kind`` (``--executor``) picks one of :data:`EXECUTORS` (docs/distributed.md):

- ``local`` (the default): this process, one thing at a time: the build's serial layer loop
  (:func:`~automl_compress.database.build.build_database`) and the Evaluator's one-by-one scores.
  Nothing on this path imports Ray.
- ``ray``: :class:`automl_compress.distributed.RayExecutor`: the (layer, option) solves of the
  build as Ray tasks, and batches of plans scored by a pool of Ray actors that each hold the
  model once. It needs the ``distributed`` extra (``pip install "automl-compress[distributed]"``).

Both give the same database and the same search results: the same solver and evaluation code
runs on the same inputs, and only the place it runs changes.

An executor has three methods: ``solve_layers(works, cfg, device, write, progress)`` (Ray only:
the build calls its own loop for ``local``), ``scorer(prepared)`` (a function scoring a list of
``(plan, fraction, eval_cfg)`` at once, or None to score one by one) and ``close()``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from automl_compress.config import ExecutorConfig
from automl_compress.errors import ConfigError, ExecutorError

EXECUTORS: dict[str, str] = {
    "local": "automl_compress.executors:LocalExecutor",
    "ray": "automl_compress.distributed:RayExecutor",
}
"""kind -> ``module:class``, imported only when that kind is asked for."""

INSTALL_HINT = 'pip install "automl-compress[distributed]"'


class LocalExecutor:
    """Everything in this process, serially (today's behaviour)."""

    kind = "local"
    distributed = False

    def __init__(self, cfg: ExecutorConfig | None = None) -> None:
        self.cfg = cfg or ExecutorConfig()

    def scorer(self, prepared: Any) -> None:
        """No batch scorer: the Evaluator scores plans one by one in this process."""
        return None

    def close(self) -> None:
        """Nothing to release."""


def ray_available() -> bool:
    """Whether the ``distributed`` extra (Ray) is installed."""
    return importlib.util.find_spec("ray") is not None


def get_executor(cfg: ExecutorConfig | None = None) -> Any:
    """The executor ``cfg`` asks for (connected, for Ray).

    Raises:
        ConfigError: an unknown ``executor.kind``.
        ExecutorError: ``ray`` without Ray installed, or a Ray cluster that cannot be reached.
    """
    cfg = cfg or ExecutorConfig()
    if cfg.kind not in EXECUTORS:
        raise ConfigError(f"executor.kind must be one of {list(EXECUTORS)}, found {cfg.kind!r}")
    if cfg.kind == "ray" and not ray_available():
        raise ExecutorError(
            "--executor ray needs Ray, which is not installed in this environment; install the "
            f"distributed extra ({INSTALL_HINT}) or use --executor local"
        )
    module, name = EXECUTORS[cfg.kind].split(":")
    return getattr(importlib.import_module(module), name)(cfg)


@contextmanager
def open_executor(cfg: ExecutorConfig | None = None) -> Iterator[Any]:
    """:func:`get_executor` for the length of a ``with`` block, closed on the way out.

    A Ray executor stops its actors, and Ray itself if it started it.
    """
    ex = get_executor(cfg)
    try:
        yield ex
    finally:
        ex.close()
