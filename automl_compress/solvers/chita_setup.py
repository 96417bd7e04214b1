"""CHITA's set-up: option checks, the column order and the warm start it refines.

The warm start is ExactOBS or SparseGPT's mask (or one the caller gives), re-solved on its
support, optionally quantized (docs/pruning.md §1); :mod:`.chita` runs the refinement steps on it.
"""

from __future__ import annotations

import torch

from automl_compress.errors import InvalidInputError, NMPatternError, ShapeMismatchError
from automl_compress.solvers.checks import check_bits, check_n_m, check_sparsity
from automl_compress.solvers.exact_obs import channel_major_perm, exact_obs_prune
from automl_compress.solvers.hessian import row_errors
from automl_compress.solvers.lstsq import resolve_on_mask
from automl_compress.solvers.result import SolveResult
from automl_compress.solvers.sparsegpt import sparsegpt_prune

WARM_STARTS = ("exact_obs", "sparsegpt")
QUANTIZERS = ("gptq", "obq")


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidInputError(f"{name} must be an int >= {low}, found {value!r}")


def check_options(iht_iters, refresh, candidates, kernel_area, max_swaps, kimp, rtol, damp,
                   allocation, quant, bits) -> None:
    """Raise InvalidInputError (or BitsOutOfRangeError) for the first bad scalar option."""
    _check_int("iht_iters", iht_iters, 0)
    _check_int("refresh", refresh, 1)
    _check_int("candidates", candidates, 1)
    _check_int("kernel_area", kernel_area, 1)
    if max_swaps is not None:
        _check_int("max_swaps", max_swaps, 0)
    if isinstance(kimp, bool) or not isinstance(kimp, (int, float)) or not kimp >= 1.0:
        raise InvalidInputError(f"kimp must be a number >= 1, found {kimp!r}")
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0.0 <= rtol < 1.0:
        raise InvalidInputError(f"rtol must be a number in [0, 1), found {rtol!r}")
    if not isinstance(damp, (int, float)) or not 0.0 <= damp < 10.0:
        raise InvalidInputError(f"damp must be a number in [0, 10), found {damp!r}")
    if allocation not in ("global", "uniform"):
        raise InvalidInputError(f"allocation must be 'global' or 'uniform', found {allocation!r}")
    if quant not in QUANTIZERS:
        raise InvalidInputError(f"quant must be one of {QUANTIZERS}, found {quant!r}")
    if bits is not None:
        check_bits(bits, allow_zero=False)


def column_order(n_m, cols: int, kernel_area: int, warm_start, sparsity):
    """The checked N:M pattern (or None) and the column order the steps work in.

    N:M groups run along input channels at one tap (channel-major), unstructured keeps the given
    order.
    """
    if n_m is None:
        if not isinstance(warm_start, (torch.Tensor, SolveResult)):
            check_sparsity(sparsity)
        return None, torch.arange(cols)
    n_m = check_n_m(n_m, cols)
    if (cols // kernel_area) % n_m[1]:
        raise NMPatternError(
            f"N:M {n_m[0]}:{n_m[1]} runs along input channels, so C_in = {cols // kernel_area}"
            f" (cols {cols} / kernel_area {kernel_area}) must be a multiple of {n_m[1]}; use "
            "unstructured sparsity for this layer"
        )
    return n_m, channel_major_perm(cols, kernel_area)


def build_warm_start(W, H, sparsity, n_m, warm_start, allocation, kernel_area, damp, dtype):
    """The warm start's SolveResult (weights and per-row errors) and its name."""
    if isinstance(warm_start, SolveResult):
        if warm_start.mask is None:
            raise InvalidInputError(
                "warm_start must be a pruning result with a mask, found a dense SolveResult; pass "
                "the result of exact_obs_prune or sparsegpt_prune"
            )
        check_mask(warm_start.mask, W, n_m, kernel_area)
        err = warm_start.row_error
        if err is None:
            err = row_errors(W, warm_start.weight, H)
        res = SolveResult(warm_start.weight, err.to(W.device), mask=warm_start.mask.to(W.device))
        return res, str(warm_start.info.get("method", "result"))
    if isinstance(warm_start, torch.Tensor):
        check_mask(warm_start, W, n_m, kernel_area)
        return resolve_on_mask(W, H, warm_start.to(W.device), damp, dtype=dtype), "mask"
    if warm_start == "exact_obs":
        kw = {"n_m": n_m} if n_m is not None else {"sparsity": sparsity, "allocation": allocation}
        res = exact_obs_prune(W, H, kernel_area=kernel_area, damp=damp, dtype=dtype, **kw)
        return res, "exact_obs"
    if warm_start == "sparsegpt":
        kw = {"n_m": n_m} if n_m is not None else {"sparsity": sparsity}
        return sparsegpt_prune(W, H, kernel_area=kernel_area, damp=damp, dtype=dtype, **kw), (
            "sparsegpt"
        )
    raise InvalidInputError(
        f"warm_start must be one of {WARM_STARTS}, a (rows, cols) bool mask or a pruning "
        f"SolveResult, found {warm_start!r}"
    )


def check_mask(mask, W, n_m, kernel_area) -> None:
    """Raise unless ``mask`` is a (rows, cols) bool mask of W keeping exactly N of every M (n_m)."""
    if not isinstance(mask, torch.Tensor) or mask.shape != W.shape or mask.dtype != torch.bool:
        found = (tuple(mask.shape), mask.dtype) if isinstance(mask, torch.Tensor) else type(mask)
        raise ShapeMismatchError(
            f"warm-start mask must be a bool tensor of W's shape {tuple(W.shape)}, found "
            f"{found}; pass result.mask of a pruning solver (True = kept)"
        )
    if n_m is not None:
        n, m = n_m
        perm = channel_major_perm(W.shape[1], kernel_area).to(mask.device)
        per_group = mask[:, perm].reshape(W.shape[0], -1, m).sum(2)
        if not bool((per_group == n).all()):
            raise NMPatternError(
                f"warm-start mask must keep exactly {n} of every {m} weights (along input "
                f"channels, kernel_area {kernel_area}), found group counts from "
                f"{int(per_group.min())} to {int(per_group.max())}"
            )
