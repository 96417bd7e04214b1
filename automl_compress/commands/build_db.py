"""``automl-compress build-db``: solve every layer at every option once and cache it."""

from __future__ import annotations

import time
from pathlib import Path

from automl_compress import pipeline
from automl_compress.commands import rundir
from automl_compress.config import Config
from automl_compress.executors import open_executor


def run(cfg: Config, out: str | Path) -> int:
    """Build (or complete) the layer database under ``out/db`` on ``cfg.executor``.

    The database is built with its objective; writes ``out/config.yaml`` and prints what was built.

    Args:
        cfg: the resolved config.
        out: the run directory.

    Returns:
        0 on success.

    Raises:
        DatabaseMismatchError: ``out/db`` holds another setup's database.
        ExecutorError: ``executor.kind=ray`` without Ray, or an unreachable cluster.
    """
    t0 = time.perf_counter()
    with open_executor(cfg.executor) as ex:
        prepared = pipeline.prepare(cfg, out, executor=ex)
    rundir.write_config(out, cfg)
    n = sum(t.info.numel for t in prepared.tables)
    print(
        f"layer database: {len(prepared.tables)} layers, {n} compressible weights, menu bits "
        f"{list(cfg.menu.bits)} x patterns {list(cfg.menu.patterns)}, "
        f"{time.perf_counter() - t0:.1f} s -> {prepared.db_dir}"
    )
    return 0
