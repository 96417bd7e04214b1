"""What solving one layer takes: its Hessian pieces, its patterns, its units and solver options.

A layer's captured Hessian (:class:`~automl_compress.capture.LayerHessian`) splits into independent
pieces, one per (row group, column block): grouped convs solve each group's rows with its own H,
and a block-diagonal H (very wide layers) solves its column blocks independently, the row errors
adding up (docs/solvers.md §1). A :class:`Unit` is one piece at one pattern with the bit-widths
solved together: a sparse pattern's bit-widths share one pruning pass unless (prune, quant) is one
joint pass; a dense option is one unit per bit-width; :data:`RTN` units hold the round-to-nearest
baseline. The serial build and the Ray tasks (:mod:`automl_compress.distributed`) solve the same
units (:mod:`automl_compress.database.solve`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from automl_compress.capture import LayerHessian
from automl_compress.config import MenuConfig, SolverConfig, parse_pattern
from automl_compress.database.costs import pattern_fits
from automl_compress.solvers.hessian import InverseFactors
from automl_compress.solvers.quantizer import GridSpec
from automl_compress.solvers.registry import (
    JOINT,
    PruneSolver,
    QuantSolver,
    SolveOptions,
    estimated_seconds,
)
from automl_compress.specs import LayerInfo

RTN = "rtn"  # a unit's pattern for the round-to-nearest baseline (dense, every bit-width)

# ---------------------------------------------------------------------------------------------
# Solver options


def grid_spec(cfg: SolverConfig) -> GridSpec:
    """The per-row grid the solvers fit."""
    return GridSpec(symmetric=cfg.symmetric, search=cfg.grid_search)


def solve_options(pattern: str, bits: int, cfg: SolverConfig, area: int = 1,
                  factors: InverseFactors | None = None) -> SolveOptions:
    """The registry's options for one (pattern, bits) of a layer.

    ``area`` is the conv kernel area; ``factors`` the piece's H factors, shared by its solves.
    """
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
        polish=cfg.polish,
        carry=cfg.fast_carry,
        factors=factors,
    )


def quant_solver(cfg: SolverConfig, rows: int, cols: int) -> QuantSolver:
    """``solver.quant``, or the fast mode where exact OBQ is estimated over ``exact_max_s``."""
    quant = QuantSolver(cfg.quant)
    limit = cfg.exact_max_s
    too_slow = limit is not None and estimated_seconds(quant, rows, cols) > limit
    return QuantSolver.FAST if quant is QuantSolver.OBQ and too_slow else quant


# ---------------------------------------------------------------------------------------------
# Pieces and patterns


def hessian_blocks(lh: LayerHessian) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """(row slice, column slice, H block) pieces of a captured layer Hessian.

    Grouped convs: one piece per group (rows of that group, all columns, its own H). Block-diagonal
    fallback: one piece per (group, column block) (:meth:`LayerHessian.iter_blocks`).
    """
    for _, rows, cols, Hb in lh.iter_blocks():
        yield rows, cols, Hb


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
# Units


@dataclass(frozen=True)
class Unit:
    """One independent solve of a layer.

    One (row group, column block) piece at one pattern and the bit-widths solved together (a sparse
    pattern's share one pruning pass; a dense or joint option is one unit per bit-width). The serial
    loop and the Ray tasks solve the same units.
    """

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
        """The menu's nonzero bit-widths, ascending."""
        return tuple(b for b in self.bits if b > 0)

    def piece_inputs(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(W block, H block) of piece ``k``: the inputs of its units."""
        rs, cs, Hb = self.pieces[k]
        return self.W[rs, cs].detach(), Hb


def layer_work(info: LayerInfo, W: torch.Tensor, lh: LayerHessian,
               menu: MenuConfig) -> LayerWork:
    """The pieces and menu of one layer (``lh``: its captured Hessian)."""
    pieces = list(hessian_blocks(lh))
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
