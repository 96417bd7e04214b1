"""Build the layer database: solve every selected layer at every option of the menu once.

For each layer (forward order) and each option (pattern × bits > 0) the solver registry
(:mod:`automl_compress.solvers.registry`) runs on every (row group, column block) of the layer's
Hessian: grouped convs solve each group's rows with its own H, and a block-diagonal H (very wide
layers) solves its column blocks independently, the row errors adding up (docs/solvers.md §1).
A dense option runs ``solver.quant``; a sparse option runs ``solver.prune`` once per pattern with
one exact count of kept weights per row (so every row's cost is exact), then ``solver.quant`` on
the kept weights at every bit-width; (SparseGPT, GPTQ) is one joint pass instead. With
``solver.exact_max_s`` set, OBQ gives way to the fast mode on pieces whose estimated OBQ time is
larger. The 0-bit column is the row's full output energy ``0.5 · w H wᵀ`` (under the centred H
when ``capture.centered``). Round-to-nearest is stored too, for the ``rtn`` baseline.

The stored error of every option is recomputed from the stored (rebuilt) weights under the undamped
captured H, so the error of any stitched mixture equals the sum of its table entries to round-off.

Each finished layer is written atomically and recorded in the manifest; a killed build resumes at
the first unfinished layer. A layer file that fails its checksum is re-solved with a warning.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from automl_compress.capture import capture_hessians
from automl_compress.config import CaptureConfig, Config, MenuConfig, SolverConfig, parse_pattern
from automl_compress.database.costs import kept_per_row, pattern_fits
from automl_compress.database.store import LayerDatabase, LayerSolutions, OptionSolution
from automl_compress.database.tables import LayerInfo, LayerTable
from automl_compress.solvers import registry
from automl_compress.solvers.baselines import rtn_quantize
from automl_compress.solvers.hessian import row_errors
from automl_compress.solvers.quantizer import GridSpec
from automl_compress.solvers.registry import (
    JOINT,
    PruneSolver,
    QuantSolver,
    SolveOptions,
    estimated_seconds,
)
from automl_compress.solvers.result import SolveResult
from automl_compress.specs import Task, model_fingerprint

SOLVER_VERSION = "2"  # 2: sparse options honour solver.quant; float32 greedy solves

# ---------------------------------------------------------------------------------------------
# Fingerprints


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


# ---------------------------------------------------------------------------------------------
# Solving one option


def grid_spec(cfg: SolverConfig) -> GridSpec:
    """The per-row grid the solvers fit."""
    return GridSpec(symmetric=cfg.symmetric, search=cfg.grid_search)


def solve_options(pattern: str, bits: int, cfg: SolverConfig, area: int = 1) -> SolveOptions:
    """The registry's options for one (pattern, bits) of a layer (``area``: conv kernel area)."""
    kind, arg = parse_pattern(pattern)
    return SolveOptions(
        bits=bits,
        n_m=arg if kind == "nm" else None,  # type: ignore[arg-type]
        sparsity=arg if kind == "unstructured" else None,  # type: ignore[arg-type]
        grid=grid_spec(cfg),
        damp=cfg.damp,
        row_batch=cfg.row_batch,
        kernel_area=area,
        allocation="uniform",  # one exact count per row, so every row's stored cost is exact
    )


def quant_solver(cfg: SolverConfig, rows: int, cols: int) -> QuantSolver:
    """``solver.quant``, or the fast mode where exact OBQ is estimated over ``exact_max_s``."""
    quant = QuantSolver(cfg.quant)
    limit = cfg.exact_max_s
    too_slow = limit is not None and estimated_seconds(quant, rows, cols) > limit
    return QuantSolver.FAST if quant is QuantSolver.OBQ and too_slow else quant


def rtn_option(W: torch.Tensor, H: torch.Tensor, bits: int, cfg: SolverConfig) -> SolveResult:
    """Round-to-nearest on the same grid family (the ``rtn`` baseline)."""
    return rtn_quantize(W, bits, H=H, grid=grid_spec(cfg))


# ---------------------------------------------------------------------------------------------
# Hessian blocks


def hessian_blocks(lh: Any, rows: int, cols: int) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """(row slice, column slice, H block) pieces of a captured layer Hessian.

    Grouped convs: one piece per group (rows of that group, all columns, its own H). Block-diagonal
    fallback: one piece per (group, column block).
    """
    blocks = getattr(lh, "iter_blocks", None)
    if callable(blocks):
        for item in blocks():
            _, r, c, Hb = item
            yield _as_slice(r), _as_slice(c), Hb
        return
    H = lh.H
    if H.dim() == 2:
        H = H[None]
    groups = H.shape[0]
    per = rows // groups
    for g in range(groups):
        yield slice(g * per, (g + 1) * per), slice(0, cols), H[g]


def _as_slice(x: Any) -> slice:
    if isinstance(x, slice):
        return x
    if isinstance(x, range):
        return slice(x.start, x.stop)
    if isinstance(x, (tuple, list)) and len(x) == 2:
        return slice(int(x[0]), int(x[1]))
    raise TypeError(f"expected a slice, range or (start, stop) pair, found {x!r}")


def kernel_area(info: LayerInfo) -> int:
    """kh·kw of a conv (1 for linear): N:M groups run along input channels at one tap."""
    return int(np.prod(info.kernel)) if info.kernel and info.kind != "linear" else 1


def layer_patterns(info: LayerInfo, patterns: tuple[str, ...]) -> tuple[str, ...]:
    """The menu patterns a layer can take, 'dense' first (N:M needs C_in % M == 0)."""
    out = ["dense"]
    for p in patterns:
        if p == "dense" or not pattern_fits(info.cols, p):
            continue
        kind, arg = parse_pattern(p)
        if kind == "nm" and (info.cols // kernel_area(info)) % arg[1]:
            continue
        out.append(p)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Solving one layer


def _codes(res: SolveResult, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if res.scale is None or res.zero is None:
        raise RuntimeError(
            f"solver returned no grid for a {bits}-bit option (scale/zero are None); expected a "
            "quantized SolveResult"
        )
    maxq = 2**bits - 1
    s = res.scale.detach().to(torch.float64).cpu()
    z = res.zero.detach().to(torch.float64).cpu()
    w = res.weight.detach().to(torch.float64).cpu()
    q = torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, maxq)
    return q.to(torch.uint8), s.to(torch.float32), z.to(torch.float32)


def _check_pattern(mask: torch.Tensor, pattern: str, n_blocks: int, name: str) -> None:
    kind, arg = parse_pattern(pattern)
    cols = mask.shape[1]
    kept = mask.sum(dim=1)
    limit = kept_per_row(cols, pattern) + (n_blocks - 1 if kind == "unstructured" else 0)
    if bool((kept > limit).any()):
        raise RuntimeError(
            f"layer {name!r}, pattern {pattern}: a row keeps {int(kept.max())} weights, at most "
            f"{limit} allowed; the solver did not honour the per-row count"
        )


RTN = "rtn"  # a unit's pattern for the round-to-nearest baseline (dense, every bit-width)


@dataclass(frozen=True)
class Unit:
    """One independent solve of a layer: one (row group, column block) piece at one pattern and
    the bit-widths solved together (a sparse pattern's share one pruning pass; a dense or joint
    option is one unit per bit-width). The serial loop and the Ray tasks solve the same units."""

    piece: int
    pattern: str
    bits: tuple[int, ...]


@dataclass(frozen=True)
class LayerWork:
    """What solving one layer takes: its weights, its Hessian pieces and its menu.

    Attributes:
        info: layer metadata.
        W: (rows, cols) dense weights.
        pieces: (row slice, column slice, H block) per piece (:func:`hessian_blocks`).
        patterns: the layer's patterns, 'dense' first (:func:`layer_patterns`).
        bits: every menu bit-width, ascending (0 included).
        col_blocks: the distinct column ranges of the pieces, in order.
        area: the kernel area N:M groups run over (1 for block-diagonal pieces).
    """

    info: LayerInfo
    W: torch.Tensor
    pieces: list[tuple[slice, slice, torch.Tensor]]
    patterns: tuple[str, ...]
    bits: tuple[int, ...]
    col_blocks: list[tuple[int, int]]
    area: int

    @property
    def quant_bits(self) -> tuple[int, ...]:
        return tuple(b for b in self.bits if b > 0)

    def piece_inputs(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(W block, H block) of piece ``k``: the inputs of its units."""
        rs, cs, Hb = self.pieces[k]
        return self.W[rs, cs].detach(), Hb


def layer_work(info: LayerInfo, W: torch.Tensor, lh: Any, menu: MenuConfig) -> LayerWork:
    """The pieces and menu of one layer (``lh``: the captured Hessian, see
    :func:`hessian_blocks`)."""
    rows, cols = W.shape
    pieces = list(hessian_blocks(lh, rows, cols))
    col_blocks = sorted({(c.start, c.stop) for _, c, _ in pieces})
    area = kernel_area(info) if len(col_blocks) == 1 else 1
    return LayerWork(info, W, pieces, layer_patterns(info, tuple(menu.patterns)),
                     tuple(sorted(int(b) for b in menu.bits)), col_blocks, area)


def layer_units(work: LayerWork, cfg: SolverConfig) -> list[Unit]:
    """Every unit of a layer, piece by piece: round-to-nearest, then each pattern."""
    qb = work.quant_bits
    if not qb:
        return []
    units = []
    for k, (rs, cs, _) in enumerate(work.pieces):
        quant = quant_solver(cfg, rs.stop - rs.start, cs.stop - cs.start)
        units.append(Unit(k, RTN, qb))
        for p in work.patterns:
            shared = p != "dense" and (PruneSolver(cfg.prune), quant) not in JOINT
            units.extend([Unit(k, p, qb)] if shared else [Unit(k, p, (b,)) for b in qb])
    return units


PieceSolution = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]
"""(bits, uint8 codes, scale, zero, keep-mask or None) of one piece at one option, on the CPU."""


def solve_unit(Wb: torch.Tensor, Hb: torch.Tensor, pattern: str, bits: tuple[int, ...],
               cfg: SolverConfig, area: int = 1,
               device: str | torch.device = "cpu") -> list[PieceSolution]:
    """Solve one unit: a piece's (W, H) block at ``pattern`` (or :data:`RTN`) and ``bits``.

    A sparse pattern is pruned once for all of ``bits`` (unless the solvers are one joint pass),
    then quantized at each bit-width; the results come back as grid codes on the CPU.
    """
    Wb = Wb.detach().to(device=device, dtype=torch.float32)
    Hd = Hb.to(device=device, dtype=torch.float64)
    quant = quant_solver(cfg, *Wb.shape)
    if pattern == RTN:
        results = [(b, rtn_option(Wb, Hd, b, cfg)) for b in bits]
    else:
        prune_with = PruneSolver(cfg.prune)
        opts = solve_options(pattern, bits[0], cfg, area)
        shared = None
        if not opts.dense and (prune_with, quant) not in JOINT:
            shared = registry.prune(Wb, Hd, opts, prune_with)
        results = [(b, registry.solve(Wb, Hd, solve_options(pattern, b, cfg, area), quant,
                                      prune_with, shared)) for b in bits]
    out = []
    for b, res in results:
        q, s, z = _codes(res, b)
        mask = None
        if res.mask is not None:
            mask = res.mask.detach().cpu()
            q = torch.where(mask, q, z.round().to(torch.uint8)[:, None].expand_as(q))
        out.append((b, q, s, z, mask))
    return out


def assemble_layer(work: LayerWork,
                   solved: Mapping[Unit, Sequence[PieceSolution]]) -> LayerSolutions:
    """The layer's solutions and exact error table from the solutions of all its units.

    Every stored error is recomputed here from the rebuilt weights under the undamped H.
    """
    info, W = work.info, work.W
    rows, cols = W.shape
    bits, quant_bits, patterns = work.bits, work.quant_bits, work.patterns
    pieces = work.pieces
    blk_index = {cb: k for k, cb in enumerate(work.col_blocks)}
    nb = len(work.col_blocks)
    W64 = W.detach().to(torch.float64).cpu()

    def empty() -> dict[str, torch.Tensor]:
        return {
            "codes": torch.zeros(rows, cols, dtype=torch.uint8),
            "scale": torch.ones(rows, nb, dtype=torch.float32),
            "zero": torch.zeros(rows, nb, dtype=torch.float32),
            "mask": torch.ones(rows, cols, dtype=torch.bool),
        }

    acc = {(p, b): empty() for p in patterns for b in quant_bits}
    acc_rtn = {b: empty() for b in quant_bits}
    for unit, sols in solved.items():
        rs, cs, _ = pieces[unit.piece]
        k = blk_index[(cs.start, cs.stop)]
        for b, q, s, z, mask in sols:
            into = acc_rtn[b] if unit.pattern == RTN else acc[(unit.pattern, b)]
            if mask is not None:
                into["mask"][rs, cs] = mask
            into["codes"][rs, cs] = q
            into["scale"][rs, k] = s
            into["zero"][rs, k] = z

    def finished(a: dict[str, torch.Tensor], pattern: str) -> OptionSolution:
        dense = parse_pattern(pattern)[0] == "dense"
        if not dense:
            _check_pattern(a["mask"], pattern, nb, info.name)
        return OptionSolution(a["codes"], a["scale"], a["zero"], None if dense else a["mask"])

    blocks_t = torch.tensor(work.col_blocks, dtype=torch.int64).reshape(-1, 2)

    def errors_of(sol: OptionSolution) -> torch.Tensor:
        W_hat = sol.weight(blocks_t).to(torch.float64)
        err = torch.zeros(rows, dtype=torch.float64)
        for rs, cs, Hb in pieces:
            err[rs] += row_errors(W64[rs, cs], W_hat[rs, cs], Hb.detach().cpu())
        return err

    zero_err = torch.zeros(rows, dtype=torch.float64)
    for rs, cs, Hb in pieces:
        zero_err[rs] += row_errors(W64[rs, cs], torch.zeros_like(W64[rs, cs]), Hb.detach().cpu())

    errors = np.zeros((rows, len(patterns), len(bits)))
    rtn_errors = np.zeros((rows, len(bits)))
    options: dict[tuple[str, int], OptionSolution] = {}
    rtn: dict[int, OptionSolution] = {}
    for bi, b in enumerate(bits):
        if b == 0:
            errors[:, :, bi] = zero_err.numpy()[:, None]
            rtn_errors[:, bi] = zero_err.numpy()
            continue
        rtn[b] = finished(acc_rtn[b], "dense")
        rtn_errors[:, bi] = errors_of(rtn[b]).numpy()
        for pi, p in enumerate(patterns):
            options[(p, b)] = finished(acc[(p, b)], p)
            errors[:, pi, bi] = errors_of(options[(p, b)]).numpy()
    table = LayerTable(info, bits, patterns, errors)
    return LayerSolutions(table, rtn_errors, options, rtn, blocks_t)


def solve_layer(
    info: LayerInfo,
    W: torch.Tensor,
    lh: Any,
    menu: MenuConfig,
    cfg: SolverConfig,
    device: str | torch.device = "cpu",
) -> LayerSolutions:
    """Every option of the menu for one layer: its units (:func:`layer_units`) solved in turn,
    then assembled (:func:`assemble_layer`).

    Each (row group, column block) piece is pruned once per sparse pattern (one pass serves every
    bit-width of the pattern), then quantized at every bit-width.

    Args:
        info: layer metadata.
        W: (rows, cols) dense weights (``weight.flatten(1)``).
        lh: the captured Hessian (see :func:`hessian_blocks`).
        menu: bits × patterns.
        cfg: solver settings.
        device: where the solvers run.
    """
    work = layer_work(info, W, lh, menu)
    solved = {}
    for u in layer_units(work, cfg):
        Wb, Hb = work.piece_inputs(u.piece)
        solved[u] = solve_unit(Wb, Hb, u.pattern, u.bits, cfg, work.area, device)
    return assemble_layer(work, solved)


# ---------------------------------------------------------------------------------------------
# The whole database


def _capture(task: Task, cap: CaptureConfig, include: tuple[str, ...], device: str) -> dict:
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
    db = LayerDatabase.create_or_resume(root, fingerprints(task, cfg))
    if db.complete:
        bad = {i.name: db.verify_layer(i.name) for i in db.order}
        bad = {k: v for k, v in bad.items() if v is not None}
        if not bad:
            return db
    for name in list(db.finished()):
        problem = db.verify_layer(name)
        if problem is not None:
            warnings.warn(
                f"layer database: {name!r} is corrupt ({problem}); re-solving that layer",
                stacklevel=2,
            )
            db.forget_layer(name)
    done = set(db.finished())
    include = cfg.capture.include
    if db.order:
        pending = [i.name for i in db.order if i.name not in done]
        include = tuple(pending)
    else:
        pending = None
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
