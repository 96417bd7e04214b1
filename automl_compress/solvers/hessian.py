"""Hessian preparation shared by every solver (docs/solvers.md §5).

``H = 2 XᵀX / n`` from calibration inputs (see :mod:`automl_compress.capture`). Before a solve, dead
inputs (zero diagonal: the input never fired) are given a unit-scale diagonal and their weight
columns are zeroed (their inputs are always zero, so this costs nothing), and a relative damping of
``damp * mean(diag H)`` is added. Errors are always reported under the *undamped* H.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from automl_compress.errors import HessianNotPSDError
from automl_compress.solvers.numerics import restricted

DEFAULT_DAMP = 0.01


@dataclass(frozen=True)
class PreparedHessian:
    """A Hessian ready for a solve.

    Attributes:
        H: (cols, cols) float64, damped, dead diagonal entries replaced.
        dead: (cols,) bool, True for inputs with zero diagonal.
        damp: the absolute damping that was added to the diagonal.
    """

    H: torch.Tensor
    dead: torch.Tensor
    damp: float


def prepare_hessian(H: torch.Tensor, damp: float = DEFAULT_DAMP) -> PreparedHessian:
    """Damp H and neutralise dead inputs.

    Args:
        H: (cols, cols) symmetric PSD Hessian (any float dtype).
        damp: relative damping, a fraction of the mean live diagonal (default 1%).

    Returns:
        The prepared Hessian in float64 on H's device.
    """
    if damp < 0:
        raise ValueError(f"damp must be >= 0, found {damp}")
    Hd = H.to(torch.float64).clone()
    diag = torch.diagonal(Hd)
    top = diag.abs().max() if diag.numel() else torch.zeros((), dtype=torch.float64)
    if bool((diag < -1e-9 * torch.clamp(top, min=1e-300)).any()):
        raise HessianNotPSDError(
            f"H must be positive semi-definite, found negative diagonal entries (min "
            f"{float(diag.min()):.3g}); expected 2·XᵀX/n from calibration inputs"
        )
    dead = diag <= 1e-12 * torch.clamp(top, min=1e-300)
    live = ~dead
    mean_live = diag[live].mean() if bool(live.any()) else torch.ones((), dtype=torch.float64)
    Hd[dead, :] = 0.0
    Hd[:, dead] = 0.0
    idx = torch.nonzero(dead).flatten()
    Hd[idx, idx] = mean_live
    lam = float(damp * mean_live)
    Hd.diagonal().add_(lam)
    return PreparedHessian(H=Hd, dead=dead, damp=lam)


def cholesky_checked(H: torch.Tensor, what: str = "H") -> torch.Tensor:
    """Lower Cholesky factor of H, or a :class:`HessianNotPSDError` that says what to do."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise HessianNotPSDError(
            f"{what} ({H.shape[0]}x{H.shape[0]}) is not positive definite even after damping "
            f"(Cholesky failed at pivot {int(info)}); expected a PSD Hessian 2·XᵀX/n: check the "
            "calibration inputs for NaN/Inf, or raise the damping (e.g. damp=0.1)"
        )
    return L


def inverse_hessian(prepared: PreparedHessian) -> torch.Tensor:
    """``H⁻¹`` of the prepared (damped) Hessian, float64, via Cholesky."""
    L = cholesky_checked(prepared.H)
    return torch.cholesky_inverse(L)


def upper_cholesky_of_inverse(prepared: PreparedHessian) -> torch.Tensor:
    """Upper factor U with ``H⁻¹ = UᵀU`` (GPTQ's reformulation, docs/solvers.md §6), float64."""
    Hinv = inverse_hessian(prepared)
    return cholesky_checked(Hinv, "H⁻¹").mH.contiguous()


class InverseFactors:
    """One H's prepared form and the upper factors U of its inverse, each computed once.

    The fixed-order solvers (GPTQ, SparseGPT, the fast mode) factor ``H⁻¹ = UᵀU`` in their column
    order before a sweep that costs only ``rows·cols²``; at a few thousand columns the
    ``O(cols³)`` factorisation is most of a call. A layer piece solves one H at several options
    (every bit-width of a pattern), so its solves share one ``InverseFactors``: the results are
    the same tensors a solve computes on its own.

    Args:
        H: the (cols, cols) undamped Hessian the solves receive (that same tensor).
    """

    def __init__(self, H: torch.Tensor) -> None:
        self.H = H
        self._prepared: dict[float, PreparedHessian] = {}
        self._upper: dict[tuple[float, bytes], torch.Tensor] = {}

    def _check(self, H: torch.Tensor) -> None:
        if H is not self.H:
            raise ValueError("InverseFactors answers for the H it was made with; a solve passed "
                             "another tensor (pass the same H, or no factors)")

    def prepared(self, H: torch.Tensor, damp: float) -> PreparedHessian:
        """:func:`prepare_hessian` of H at ``damp``."""
        self._check(H)
        if damp not in self._prepared:
            self._prepared[damp] = prepare_hessian(H, damp)
        return self._prepared[damp]

    def upper(self, H: torch.Tensor, damp: float, perm: torch.Tensor) -> torch.Tensor:
        """:func:`upper_cholesky_of_inverse` of the prepared H in column order ``perm``."""
        key = (damp, perm.cpu().numpy().tobytes())
        if key not in self._upper:
            self._upper[key] = permuted_upper(self.prepared(H, damp), perm)
        return self._upper[key]


def permuted_upper(prep: PreparedHessian, perm: torch.Tensor) -> torch.Tensor:
    """U of the prepared H with rows and columns in order ``perm`` (``H⁻¹ = UᵀU`` there)."""
    return upper_cholesky_of_inverse(
        PreparedHessian(H=prep.H[perm][:, perm], dead=prep.dead[perm], damp=prep.damp))


def row_errors(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Exact per-row error ``0.5 · (w - ŵ) H (w - ŵ)ᵀ`` in float64 under the given (undamped) H."""
    D = (W.to(torch.float64) - W_hat.to(torch.float64))
    Hd = H.to(device=D.device, dtype=torch.float64)
    return 0.5 * ((D @ Hd) * D).sum(dim=1)


def support_inverse(H: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's inverse of H restricted to its kept coordinates, padded to one size.

    :param H: (cols, cols) prepared (damped, positive-definite) Hessian.
    :param keep: (R, cols) bool, True where a row's weight is kept.
    :returns: ``(idx, Hinv)``: idx (R, k) the kept columns of each row in column order, padded
        with ``cols`` (a padding slot) up to k = the most any row keeps; Hinv (R, k, k) float64
        ``(H_SS)⁻¹`` with the identity on padding slots.
    """
    R, cols = keep.shape
    k = int(keep.sum(1).max()) if R else 0
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k]
    valid = keep.gather(1, order)
    idx = torch.where(valid, order, torch.full_like(order, cols))
    A = restricted(H.to(torch.float64), order, valid)
    L, info = torch.linalg.cholesky_ex(A, out=(A, torch.empty(R, dtype=torch.int32,
                                                               device=A.device)))
    if bool((info != 0).any()):
        raise HessianNotPSDError(
            "H restricted to a row's kept weights is not positive definite even after damping; "
            "expected a PSD Hessian 2·XᵀX/n: check the calibration inputs, or raise the damping"
        )
    return idx, torch.cholesky_inverse(L)
