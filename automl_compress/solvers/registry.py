"""Which solver runs: one typed registry of quantization and pruning solvers (docs/solvers.md §8).

An option of the layer database is (pattern, bits). A dense option runs the configured
quantization solver; a sparse one runs the configured pruning solver for the mask (and the exact
least-squares weights on it), then the quantization solver on the kept weights. The one exception
is a *joint* pass that prunes and quantizes at once (SparseGPT with GPTQ), registered in
:data:`JOINT`. Adding a solver is one enum member plus one entry:

>>> sorted(QUANT) == sorted(QuantSolver) and sorted(PRUNE) == sorted(PruneSolver)
True

Every solver receives the same :class:`SolveOptions`, and every field of it is either used by
the solver or explicitly rejected (e.g. ``row_batch`` with SparseGPT's joint-over-rows masks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from automl_compress.errors import InvalidInputError
from automl_compress.solvers.checks import check_bits, check_n_m, check_sparsity
from automl_compress.solvers.chita import chita_prune
from automl_compress.solvers.exact_obs import exact_obs_prune
from automl_compress.solvers.gptq import gptq_quantize
from automl_compress.solvers.hessian import DEFAULT_DAMP, InverseFactors
from automl_compress.solvers.numerics import auto_row_batch
from automl_compress.solvers.obq import obq_quantize
from automl_compress.solvers.quantizer import GridSpec
from automl_compress.solvers.refine import DEFAULT_CARRY, fast_quantize, polish
from automl_compress.solvers.result import SolveResult, on_mask
from automl_compress.solvers.sparsegpt import sparsegpt_prune


class QuantSolver(StrEnum):
    """Solvers that put a layer's (kept) weights on the per-row grid."""

    OBQ = "obq"  #: exact greedy per row (OBC)
    GPTQ = "gptq"  #: fixed column order
    FAST = "fast"  #: OBQ on a sliding window of a fixed column order, then 1-opt


class PruneSolver(StrEnum):
    """Solvers that choose a layer's sparsity mask and the weights on it."""

    EXACT_OBS = "exact_obs"  #: exact greedy per row (OBC)
    SPARSEGPT = "sparsegpt"  #: fixed column order, masks chosen per block
    CHITA = "chita"  #: ExactOBS's mask refined by IHT, swaps and a backsolve (docs/pruning.md)


@dataclass(frozen=True)
class SolveOptions:
    """Everything a solver is told about one option of one layer.

    :param bits: grid width of the kept weights, 2..8 (0: every row removed).
    :param n_m: N:M pattern (N kept of every M input channels at one tap), or None.
    :param sparsity: unstructured sparsity in (0, 1), or None (at most one of n_m / sparsity).
    :param grid: how the per-row grid is fitted.
    :param damp: relative damping of H.
    :param row_batch: rows per batch (None: sized to the device); honoured by every solver that
        batches rows, rejected where it would change the result.
    :param dtype: working precision (None: float32 unless W is float64).
    :param kernel_area: kh·kw of a conv (N:M groups run along input channels), 1 for Linear.
    :param allocation: per-row zero counts of unstructured sparsity: "uniform" (every row the
        same count, so every row's cost is exact) or "global" (counts chosen for the layer).
    :param polish: 1-opt after every quantization solver (``refine.polish``: never raises a
        row's error; at most about 2 % of an OBQ pass, docs/solvers.md §9.1).
    :param carry: the fast mode's window, unfixed weights a row carries past a block.
    :param factors: H's prepared form and inverse factors, shared by the solves of one H (a
        memo, not an option: no result depends on it); the fixed-order solvers (GPTQ,
        SparseGPT, fast) read it, the greedy ones factor per row and have nothing to share.
    """

    bits: int = 4
    n_m: tuple[int, int] | None = None
    sparsity: float | None = None
    grid: GridSpec = field(default_factory=GridSpec)
    damp: float = DEFAULT_DAMP
    row_batch: int | None = None
    dtype: torch.dtype | None = None
    kernel_area: int = 1
    allocation: str = "uniform"
    polish: bool = True
    carry: int = DEFAULT_CARRY
    factors: InverseFactors | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.n_m is not None and self.sparsity is not None:
            raise InvalidInputError(
                f"SolveOptions takes n_m or sparsity, not both (found n_m={self.n_m}, "
                f"sparsity={self.sparsity})"
            )
        if self.n_m is not None:
            n, m = self.n_m
            if not 0 < n < m:
                raise InvalidInputError(f"n_m = {self.n_m} must satisfy 0 < N < M, e.g. (2, 4)")
        if self.sparsity is not None:
            check_sparsity(self.sparsity)
        if self.row_batch is not None and (
            not isinstance(self.row_batch, int) or self.row_batch < 1
        ):
            raise InvalidInputError(
                f"row_batch must be None or an int >= 1, found {self.row_batch!r}"
            )
        if self.allocation not in ("uniform", "global"):
            raise InvalidInputError(
                f"allocation must be 'uniform' or 'global', found {self.allocation!r}"
            )

    @property
    def dense(self) -> bool:
        """True when the option has no sparsity pattern."""
        return self.n_m is None and self.sparsity is None


QuantFn = Callable[[torch.Tensor, torch.Tensor, SolveOptions, "torch.Tensor | None"], SolveResult]
PruneFn = Callable[[torch.Tensor, torch.Tensor, SolveOptions], SolveResult]


def _polished(W: torch.Tensor, H: torch.Tensor, o: SolveOptions, res: SolveResult) -> SolveResult:
    return polish(W, H, res) if o.polish else res


def _obq(W: torch.Tensor, H: torch.Tensor, o: SolveOptions, mask: torch.Tensor | None):
    return _polished(W, H, o, obq_quantize(W, H, o.bits, mask=mask, grid=o.grid, damp=o.damp,
                                           row_batch=o.row_batch, dtype=o.dtype))


def _gptq(W: torch.Tensor, H: torch.Tensor, o: SolveOptions, mask: torch.Tensor | None):
    return _polished(W, H, o, gptq_quantize(W, H, o.bits, mask=mask, grid=o.grid, damp=o.damp,
                                            row_batch=o.row_batch, dtype=o.dtype,
                                            factors=o.factors))


def _fast(W: torch.Tensor, H: torch.Tensor, o: SolveOptions, mask: torch.Tensor | None):
    return fast_quantize(W, H, o.bits, mask=mask, grid=o.grid, damp=o.damp,
                         row_batch=o.row_batch, dtype=o.dtype, one_opt_polish=o.polish,
                         carry=o.carry, factors=o.factors)


def _exact_obs(W: torch.Tensor, H: torch.Tensor, o: SolveOptions) -> SolveResult:
    res = exact_obs_prune(W, H, 0.0 if o.sparsity is None else o.sparsity, n_m=o.n_m,
                          allocation=o.allocation, kernel_area=o.kernel_area, damp=o.damp,
                          row_batch=o.row_batch, dtype=o.dtype)
    assert isinstance(res, SolveResult)
    return res


def _sparsegpt(W: torch.Tensor, H: torch.Tensor, o: SolveOptions) -> SolveResult:
    return sparsegpt_prune(W, H, 0.0 if o.sparsity is None else o.sparsity, n_m=o.n_m,
                           kernel_area=o.kernel_area, allocation=o.allocation,
                           row_batch=o.row_batch, damp=o.damp, dtype=o.dtype,
                           factors=o.factors)


def _chita(W: torch.Tensor, H: torch.Tensor, o: SolveOptions) -> SolveResult:
    """ExactOBS's mask (same per-row counts) refined by CHITA; the weights are unquantized."""
    return chita_prune(W, H, 0.0 if o.sparsity is None else o.sparsity, n_m=o.n_m,
                       warm_start="exact_obs", allocation=o.allocation,
                       kernel_area=o.kernel_area, damp=o.damp, row_batch=o.row_batch,
                       dtype=o.dtype)


def _sparsegpt_gptq(W: torch.Tensor, H: torch.Tensor, o: SolveOptions) -> SolveResult:
    """SparseGPT's joint pass: later mask choices see earlier rounding and vice versa."""
    res = sparsegpt_prune(W, H, 0.0 if o.sparsity is None else o.sparsity, n_m=o.n_m,
                          bits=o.bits, grid=o.grid, kernel_area=o.kernel_area,
                          allocation=o.allocation, row_batch=o.row_batch, damp=o.damp,
                          dtype=o.dtype, factors=o.factors)
    assert isinstance(res, SolveResult)
    return _polished(W, H, o, res)


#: Quantization solvers: ``fn(W, H, options, mask) -> SolveResult`` (mask: True = kept).
QUANT: dict[QuantSolver, QuantFn] = {
    QuantSolver.OBQ: _obq,
    QuantSolver.GPTQ: _gptq,
    QuantSolver.FAST: _fast,
}
#: Pruning solvers: ``fn(W, H, options) -> SolveResult`` with ``mask`` and the weights on it.
PRUNE: dict[PruneSolver, PruneFn] = {
    PruneSolver.EXACT_OBS: _exact_obs,
    PruneSolver.SPARSEGPT: _sparsegpt,
    PruneSolver.CHITA: _chita,
}
#: One-pass prune + quantize for (prune, quant) pairs that have one.
JOINT: dict[tuple[PruneSolver, QuantSolver], PruneFn] = {
    (PruneSolver.SPARSEGPT, QuantSolver.GPTQ): _sparsegpt_gptq,
}


def prune(W: torch.Tensor, H: torch.Tensor, options: SolveOptions, solver: PruneSolver):
    """The mask of a sparse option and the least-squares weights on it (no quantization)."""
    if options.dense:
        raise InvalidInputError("prune() needs a sparse option (n_m or sparsity), found dense")
    if options.n_m is not None:
        check_n_m(options.n_m, W.shape[1])
    return PRUNE[PruneSolver(solver)](W, H, options)


def solve(
    W: torch.Tensor,
    H: torch.Tensor,
    options: SolveOptions,
    quant: QuantSolver,
    prune_with: PruneSolver,
    pruned: SolveResult | None = None,
) -> SolveResult:
    """Solve one option: quantize (dense), or prune then quantize the kept weights.

    :param W: (rows, cols) weights.
    :param H: (cols, cols) undamped Hessian.
    :param options: the option and the solver settings (with ``polish``, the result is polished
        by 1-opt against the dense W, the error the database stores).
    :param quant: the quantization solver.
    :param prune_with: the pruning solver (used by sparse options).
    :param pruned: the result of :func:`prune` for this option's pattern, to reuse one pruning
        pass for every bit-width (ignored by joint passes, whose masks depend on the grid).
    :returns: SolveResult with the grid, ``mask`` for sparse options, and ``row_error`` against
        the dense W under the undamped H.
    """
    quant, prune_with = QuantSolver(quant), PruneSolver(prune_with)
    if options.dense:
        return QUANT[quant](W, H, options, None)
    joint = JOINT.get((prune_with, quant))
    if joint is not None:
        return joint(W, H, options)
    pruned = pruned if pruned is not None else prune(W, H, options, prune_with)
    # the quantizer's target is the pruned weights; the polish's is the dense W (the stored
    # error), which differ where the pruned weights are not the least-squares optimum on the mask
    res = QUANT[quant](pruned.weight, H, dataclasses.replace(options, polish=False), pruned.mask)
    return _polished(W, H, options, on_mask(W, H, pruned, res, f"{prune_with}+{quant}"))



#: One core of the project's CPU (AMD EPYC, torch 2.13, float32), fitted on bench/solvers.py's OBQ
#: timings from 256 to 1536 columns: GEMM throughput of the flushes and the cost of one greedy
#: step of one row batch.
OBQ_CPU_GFLOPS = 40.0
OBQ_CPU_STEP_S = 60e-6


def estimated_seconds(quant: QuantSolver, rows: int, cols: int) -> float:
    """Rough one-core CPU time of one quantization pass over a (rows, cols) piece.

    Only OBQ is modelled (about ``rows·cols³/3`` multiply-adds with the active set, plus a fixed
    cost per greedy step and row batch); the fixed-order solvers are taken as free next to it.
    """
    if QuantSolver(quant) is not QuantSolver.OBQ:
        return 0.0
    batches = -(-rows // auto_row_batch(rows, cols, torch.float32, torch.device("cpu")))
    return rows * cols**3 * (2 / 3) / (OBQ_CPU_GFLOPS * 1e9) + batches * cols * OBQ_CPU_STEP_S
