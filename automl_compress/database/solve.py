"""Solving one layer: every unit through the solver registry, then the layer's exact error table.

:func:`solve_unit` runs :mod:`automl_compress.solvers.registry` on one piece at one pattern: a
dense option runs ``solver.quant``; a sparse option runs ``solver.prune`` once for all its
bit-widths with one exact count of kept weights per row (so every row's cost is exact), then
``solver.quant`` on the kept weights at every bit-width; (SparseGPT, GPTQ) is one joint pass
instead. With ``solver.exact_max_s`` set, OBQ gives way to the fast mode on pieces whose estimated
OBQ time is larger. Round-to-nearest is solved too, for the ``rtn`` baseline. Solutions come back
as grid codes (:data:`PieceSolution`).

:func:`assemble_layer` puts the units' codes together and recomputes every stored error from the
stored (rebuilt) weights under the undamped captured H, so the error of any stitched mixture
equals the sum of its table entries to round-off. The 0-bit column is the row's full output
energy ``0.5 · w H wᵀ``. :func:`solve_layer` is both, in turn, for the serial build.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from automl_compress.capture import LayerHessian
from automl_compress.config import MenuConfig, SolverConfig, parse_pattern
from automl_compress.database.costs import kept_per_row
from automl_compress.database.store import LayerSolutions, OptionSolution
from automl_compress.database.tables import LayerTable
from automl_compress.database.work import (
    RTN,
    LayerWork,
    Unit,
    grid_spec,
    layer_units,
    layer_work,
    quant_solver,
    solve_options,
)
from automl_compress.solvers import registry
from automl_compress.solvers.baselines import rtn_quantize
from automl_compress.solvers.hessian import InverseFactors, row_errors
from automl_compress.solvers.registry import JOINT, PruneSolver
from automl_compress.solvers.result import SolveResult
from automl_compress.specs import LayerInfo

PieceSolution = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]
"""(bits, uint8 codes, scale, zero, keep-mask or None) of one piece at one option, on the CPU."""

# ---------------------------------------------------------------------------------------------
# One unit


def rtn_option(W: torch.Tensor, H: torch.Tensor, bits: int, cfg: SolverConfig) -> SolveResult:
    """Round-to-nearest on the same grid family (the ``rtn`` baseline)."""
    return rtn_quantize(W, bits, H=H, grid=grid_spec(cfg))


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


def _piece_solution(b: int, res: SolveResult) -> PieceSolution:
    """One solve as grid codes; pruned positions hold the zero point."""
    q, s, z = _codes(res, b)
    mask = None
    if res.mask is not None:
        mask = res.mask.detach().cpu()
        q = torch.where(mask, q, z.round().to(torch.uint8)[:, None].expand_as(q))
    return b, q, s, z, mask


def solve_unit(Wb: torch.Tensor, Hb: torch.Tensor, pattern: str, bits: tuple[int, ...],
               cfg: SolverConfig, area: int = 1,
               device: str | torch.device = "cpu") -> list[PieceSolution]:
    """Solve one unit: a piece's (W, H) block at ``pattern`` (or :data:`~.work.RTN`) and ``bits``.

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
        factors = InverseFactors(Hd)  # every bit-width's solve of this H factors it once
        opts = solve_options(pattern, bits[0], cfg, area, factors)
        shared = None
        if not opts.dense and (prune_with, quant) not in JOINT:
            shared = registry.prune(Wb, Hd, opts, prune_with)
        results = [(b, registry.solve(Wb, Hd, solve_options(pattern, b, cfg, area, factors),
                                      quant, prune_with, shared)) for b in bits]
    return [_piece_solution(b, res) for b, res in results]


# ---------------------------------------------------------------------------------------------
# The layer from its units


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


class _Codes:
    """One option's codes, scales, zero points and mask for the whole layer.

    Filled piece by piece (scale and zero per (row, column block)).
    """

    def __init__(self, rows: int, cols: int, n_blocks: int) -> None:
        self.codes = torch.zeros(rows, cols, dtype=torch.uint8)
        self.scale = torch.ones(rows, n_blocks, dtype=torch.float32)
        self.zero = torch.zeros(rows, n_blocks, dtype=torch.float32)
        self.mask = torch.ones(rows, cols, dtype=torch.bool)

    def put(self, rs: slice, cs: slice, k: int, sol: PieceSolution) -> None:
        _, q, s, z, mask = sol
        if mask is not None:
            self.mask[rs, cs] = mask
        self.codes[rs, cs] = q
        self.scale[rs, k] = s
        self.zero[rs, k] = z

    def finished(self, pattern: str, name: str) -> OptionSolution:
        """The option's solution; a sparse one is checked against its per-row count."""
        dense = parse_pattern(pattern)[0] == "dense"
        if not dense:
            _check_pattern(self.mask, pattern, self.scale.shape[1], name)
        return OptionSolution(self.codes, self.scale, self.zero, None if dense else self.mask)


def _gather(work: LayerWork, solved: Mapping[Unit, Sequence[PieceSolution]]):
    """The units' solutions per option: ``(pattern, bits) → codes`` and ``bits → rtn codes``."""
    rows, cols = work.W.shape
    nb = len(work.col_blocks)
    blk_index = {cb: k for k, cb in enumerate(work.col_blocks)}
    acc = {(p, b): _Codes(rows, cols, nb) for p in work.patterns for b in work.quant_bits}
    acc_rtn = {b: _Codes(rows, cols, nb) for b in work.quant_bits}
    for unit, sols in solved.items():
        rs, cs, _ = work.pieces[unit.piece]
        k = blk_index[(cs.start, cs.stop)]
        for sol in sols:
            b = sol[0]
            into = acc_rtn[b] if unit.pattern == RTN else acc[(unit.pattern, b)]
            into.put(rs, cs, k, sol)
    return acc, acc_rtn


def _row_errors(work: LayerWork, W64: torch.Tensor, W_hat: torch.Tensor | None) -> torch.Tensor:
    """Per-row error of ``W_hat`` (None: all zeros) under the undamped H, summed over pieces."""
    err = torch.zeros(W64.shape[0], dtype=torch.float64)
    for rs, cs, Hb in work.pieces:
        Wp = W64[rs, cs]
        Wq = torch.zeros_like(Wp) if W_hat is None else W_hat[rs, cs]
        err[rs] += row_errors(Wp, Wq, Hb.detach().cpu())
    return err


def assemble_layer(work: LayerWork,
                   solved: Mapping[Unit, Sequence[PieceSolution]]) -> LayerSolutions:
    """The layer's solutions and exact error table from the solutions of all its units.

    Every stored error is recomputed here from the rebuilt weights under the undamped H.
    """
    info, bits, patterns = work.info, work.bits, work.patterns
    rows = work.W.shape[0]
    W64 = work.W.detach().to(torch.float64).cpu()
    acc, acc_rtn = _gather(work, solved)
    blocks_t = torch.tensor(work.col_blocks, dtype=torch.int64).reshape(-1, 2)

    def errors_of(sol: OptionSolution) -> np.ndarray:
        return _row_errors(work, W64, sol.weight(blocks_t).to(torch.float64)).numpy()

    zero_err = _row_errors(work, W64, None).numpy()
    errors = np.zeros((rows, len(patterns), len(bits)))
    rtn_errors = np.zeros((rows, len(bits)))
    options: dict[tuple[str, int], OptionSolution] = {}
    rtn: dict[int, OptionSolution] = {}
    for bi, b in enumerate(bits):
        if b == 0:
            errors[:, :, bi] = zero_err[:, None]
            rtn_errors[:, bi] = zero_err
            continue
        rtn[b] = acc_rtn[b].finished("dense", info.name)
        rtn_errors[:, bi] = errors_of(rtn[b])
        for pi, p in enumerate(patterns):
            options[(p, b)] = acc[(p, b)].finished(p, info.name)
            errors[:, pi, bi] = errors_of(options[(p, b)])
    table = LayerTable(info, bits, patterns, errors)
    return LayerSolutions(table, rtn_errors, options, rtn, blocks_t)


def solve_layer(
    info: LayerInfo,
    W: torch.Tensor,
    lh: LayerHessian,
    menu: MenuConfig,
    cfg: SolverConfig,
    device: str | torch.device = "cpu",
) -> LayerSolutions:
    """Every option of the menu for one layer.

    Its units (:func:`~.work.layer_units`) are solved in turn, then assembled
    (:func:`assemble_layer`).

    Each (row group, column block) piece is pruned once per sparse pattern (one pass serves every
    bit-width of the pattern), then quantized at every bit-width.

    Args:
        info: layer metadata.
        W: (rows, cols) dense weights (``weight.flatten(1)``).
        lh: the layer's captured Hessian.
        menu: bits × patterns.
        cfg: solver settings.
        device: where the solvers run.

    Returns:
        The layer's solutions and its exact error table.
    """
    work = layer_work(info, W, lh, menu)
    solved = {}
    for u in layer_units(work, cfg):
        Wb, Hb = work.piece_inputs(u.piece)
        solved[u] = solve_unit(Wb, Hb, u.pattern, u.bits, cfg, work.area, device)
    return assemble_layer(work, solved)
