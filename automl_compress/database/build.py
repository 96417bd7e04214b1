"""Build the layer database: solve every selected layer at every option of the menu once.

For each layer (forward order) and each option (pattern × bits > 0) the layer's units
(:mod:`automl_compress.database.work`: one (row group, column block) piece of its Hessian at one
pattern) are solved and assembled into the exact error table and the stored solutions
(:mod:`automl_compress.database.solve`); this module captures the Hessians, drives the layers
through the local loop or a distributed executor, and keeps the database on disk.

Each finished layer is written atomically and recorded in the manifest; a killed build resumes at
the first unfinished layer. A layer file that fails its checksum is re-solved with a warning. A
build holds the folder's lock file from opening the manifest to marking it complete, so a second
build of the same folder (two benchmark jobs sharing a database) waits, with a warning, and then
finds the layers the first one wrote instead of racing it and leaving manifest records that no
longer match the files.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from automl_compress.capture import LayerHessian, capture_hessians
from automl_compress.config import CaptureConfig, Config
from automl_compress.database.solve import solve_layer
from automl_compress.database.store import BUILD_LOCK, LayerDatabase, LayerSolutions
from automl_compress.database.tables import LayerInfo
from automl_compress.database.work import layer_work
from automl_compress.io import exclusive_lock
from automl_compress.specs import Task, model_fingerprint

__all__ = ["SOLVER_VERSION", "build_database", "fingerprints"]

#: 2: sparse options honour solver.quant, float32 greedy solves; 3: the fast mode is the block
#: greedy of solvers/refine.py, and 1-opt follows every quantization solver (solver.polish);
#: 4: the fast mode's greedy runs on a sliding window (a row carries hard weights past a block).
SOLVER_VERSION = "4"


def fingerprints(task: Task, cfg: Config) -> dict[str, Any]:
    """What a database depends on: model, calibration, solver, menu and capture settings."""
    return {
        "model": model_fingerprint(task.model),
        "calibration": task.calib_fingerprint(),
        "solver": {"version": SOLVER_VERSION, **asdict(cfg.solver)},
        "menu": {
            "bits": sorted(int(b) for b in cfg.menu.bits),
            "patterns": list(cfg.menu.patterns),
        },
        "capture": {
            "include": list(cfg.capture.include),
            "exclude": list(cfg.capture.exclude),
            "max_dense_cols": cfg.capture.max_dense_cols,
            "block_cols": cfg.capture.block_cols,
            "centered": cfg.capture.centered,
            "max_batches": cfg.capture.max_batches,
        },
    }


def _capture(task: Task, cap: CaptureConfig, include: tuple[str, ...],
             device: str) -> dict[str, LayerHessian]:
    batches = list(task.calib)
    if cap.max_batches is not None:
        batches = batches[: cap.max_batches]
    return capture_hessians(
        task.model,
        batches,
        max_batches=cap.max_batches,
        forward=task.forward,
        include=include,
        exclude=cap.exclude,
        max_dense_cols=cap.max_dense_cols,
        block_cols=cap.block_cols,
        centered=cap.centered,
        device=device,
    )


def _forget_corrupt(db: LayerDatabase) -> None:
    """Forget every finished layer whose file is corrupt, so the build re-solves it.

    A warning is issued at the build's caller.
    """
    for name in list(db.finished()):
        problem = db.verify_layer(name)
        if problem is not None:
            warnings.warn(
                f"layer database: {name!r} is corrupt ({problem}); re-solving that layer",
                stacklevel=4,
            )
            db.forget_layer(name)


def build_database(
    task: Task,
    cfg: Config,
    root: str | Path,
    device: str = "cpu",
    progress: bool = True,
    on_layer_done: Callable[[str], None] | None = None,
    executor: Any = None,
) -> LayerDatabase:
    """Build (or finish, or just open) the database of ``task`` under ``root``.

    Args:
        task: model, calibration data and metric.
        cfg: the run config (capture, menu and solver sections are used).
        root: the database folder.
        device: where capture and solvers run ('cpu' or 'cuda').
        progress: show a tqdm bar (layers done, time left).
        on_layer_done: called with each layer name after its file is written.
        executor: where the solves run (automl_compress/executors.py): None or a local one,
            this loop; a distributed one (Ray) solves the units as tasks, and this process
            assembles and writes each layer as it completes (same tables).

    Returns:
        The complete database.

    Raises:
        DatabaseMismatchError: ``root`` holds a database for another model/calibration/menu/solver.
    """
    root = Path(root)

    def waiting(holder: str) -> None:
        warnings.warn(f"layer database {str(root)!r} is being built by another process ({holder}); "
                      "waiting for it to finish, then resuming from what it wrote", stacklevel=5)

    with exclusive_lock(root / BUILD_LOCK, on_wait=waiting):
        return _build_locked(task, cfg, root, device, progress, on_layer_done, executor)


def _build_locked(task: Task, cfg: Config, root: Path, device: str, progress: bool,
                  on_layer_done: Callable[[str], None] | None, executor: Any) -> LayerDatabase:
    db = LayerDatabase.create_or_resume(root, fingerprints(task, cfg))
    if db.complete and all(db.verify_layer(i.name) is None for i in db.order):
        return db
    _forget_corrupt(db)
    done = set(db.finished())
    include = cfg.capture.include
    if db.order:  # resuming: capture the unfinished layers only
        include = tuple(i.name for i in db.order if i.name not in done)
    hessians = _capture(task, cfg.capture, include, device) if include else {}
    if not db.order:
        infos = sorted((lh.info for lh in hessians.values()), key=lambda i: i.index)
        db.set_order(infos)
    todo = [i for i in db.order if i.name not in done]
    modules = dict(task.model.named_modules())
    bar = tqdm(total=len(db.order), initial=len(db.order) - len(todo), unit="layer",
               desc="build-db", disable=not progress, dynamic_ncols=True)

    def write(sol: LayerSolutions, note: str | None = None) -> None:
        db.write_layer(sol)
        hessians.pop(sol.info.name, None)
        if note is not None:
            bar.set_postfix_str(note)
        bar.update(1)
        if on_layer_done is not None:
            on_layer_done(sol.info.name)

    def weight(info: LayerInfo) -> torch.Tensor:
        return modules[info.name].weight.detach().flatten(1)

    try:
        if getattr(executor, "distributed", False):
            works = (layer_work(i, weight(i), hessians[i.name], cfg.menu) for i in todo)
            bar.set_description(f"build-db ({executor.kind})")
            # 'auto' lets each worker use its own GPU when it has one
            executor.solve_layers(works, cfg.solver, "auto" if cfg.device == "auto" else device,
                                  write, bar.set_postfix_str)
        else:
            for info in todo:
                t0 = time.perf_counter()
                sol = solve_layer(info, weight(info), hessians[info.name], cfg.menu, cfg.solver,
                                  device)
                write(sol, f"{info.name} {time.perf_counter() - t0:.1f}s")
    finally:
        bar.close()
    db.mark_complete()
    return db
