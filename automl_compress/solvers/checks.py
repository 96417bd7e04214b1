"""Input validation shared by every solver: one place, one wording."""

from __future__ import annotations

import torch

from automl_compress.errors import (
    BitsOutOfRangeError,
    InvalidInputError,
    NMPatternError,
    NonFiniteError,
    ShapeMismatchError,
    SparsityOutOfRangeError,
)

MIN_BITS = 2
MAX_BITS = 8


def check_weight(W: torch.Tensor) -> None:
    """Raise unless W is a finite, floating (rows, cols) tensor."""
    if not isinstance(W, torch.Tensor):
        raise InvalidInputError(f"W must be a torch.Tensor, found {type(W).__name__}")
    if W.dim() != 2:
        raise ShapeMismatchError(
            f"W must be 2-D (rows, cols), found shape {tuple(W.shape)}; flatten conv weights with "
            "W.flatten(1)"
        )
    if not W.is_floating_point():
        raise InvalidInputError(f"W must be a floating tensor, found dtype {W.dtype}")
    if not bool(torch.isfinite(W).all()):
        bad = int((~torch.isfinite(W)).sum())
        raise NonFiniteError(
            f"W must be finite, found {bad} NaN/Inf entries of {W.numel()}; check the checkpoint "
            "or the layer that produced it"
        )


def check_hessian(H: torch.Tensor, cols: int) -> None:
    """Raise unless H is a finite, symmetric (cols, cols) tensor."""
    if not isinstance(H, torch.Tensor):
        raise InvalidInputError(f"H must be a torch.Tensor, found {type(H).__name__}")
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ShapeMismatchError(f"H must be square (cols, cols), found shape {tuple(H.shape)}")
    if H.shape[0] != cols:
        raise ShapeMismatchError(
            f"H must be ({cols}, {cols}) to match W's {cols} columns, found {tuple(H.shape)}"
        )
    if not bool(torch.isfinite(H).all()):
        raise NonFiniteError(
            "H must be finite, found NaN/Inf entries; the calibration activations of this layer "
            "overflowed or were NaN"
        )
    Hd = H.to(torch.float64)
    asym = float((Hd - Hd.T).abs().max()) if cols else 0.0
    scale = float(Hd.abs().max()) if cols else 0.0
    if asym > 1e-6 * max(scale, 1e-30):
        raise InvalidInputError(
            f"H must be symmetric, found max |H - Hᵀ| = {asym:.3g} (max |H| = {scale:.3g})"
        )


def check_bits(bits: int, allow_zero: bool = True) -> None:
    """Raise unless bits is an int in {0} ∪ [2, 8] (0 only when ``allow_zero``)."""
    ok = isinstance(bits, int) and not isinstance(bits, bool)
    if ok and (MIN_BITS <= bits <= MAX_BITS or (allow_zero and bits == 0)):
        return
    allowed = f"{'0 (row removed) or ' if allow_zero else ''}an int in [{MIN_BITS}, {MAX_BITS}]"
    raise BitsOutOfRangeError(f"bits must be {allowed}, found {bits!r}")


def check_sparsity(sparsity: float) -> None:
    """Raise unless sparsity is a number in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise SparsityOutOfRangeError(f"sparsity must be a float in [0, 1), found {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise SparsityOutOfRangeError(
            f"sparsity must be in [0, 1), found {sparsity}; to remove whole rows use bits=0"
        )


def check_n_m(n_m: tuple[int, int], cols: int) -> tuple[int, int]:
    """Validate an N:M pattern and return it as ints.

    ``n_m = (N, M)`` means N of every M consecutive weights are *kept* (2:4 keeps 2 of 4); the layer
    must have ``cols % M == 0``.
    """
    try:
        n, m = (int(v) for v in n_m)
    except (TypeError, ValueError):
        raise NMPatternError(f"n_m must be a pair of ints (N, M), found {n_m!r}") from None
    if not 0 < n < m:
        raise NMPatternError(f"n_m = ({n}, {m}) must satisfy 0 < N < M (e.g. (2, 4))")
    if cols % m:
        raise NMPatternError(
            f"N:M pattern {n}:{m} needs cols % {m} == 0, found cols = {cols} "
            f"(remainder {cols % m}); use unstructured sparsity for this layer"
        )
    return n, m
