"""Per-row uniform affine quantization grids (docs/solvers.md §3).

``q(x) = s · (clamp(round(x / s) + z, 0, 2^b − 1) − z)``. Zero is always on the grid. The range
is min/max, or shrunk by a factor p ∈ {1, 1 − 1/grid, …} chosen per row to minimise
``Σ |q(x) − x|^norm`` (OBC's "MSE" search, norm 2.4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from automl_compress.solvers.checks import check_bits


@dataclass(frozen=True)
class GridSpec:
    """How a grid is fitted.

    Attributes:
        symmetric: symmetric grid ``s·{-2^(b-1) … 2^(b-1)-1}`` (zero point fixed mid-range) or
            asymmetric min/max.
        search: ``"mse"`` (shrink search) or ``"minmax"``.
        norm: exponent of the shrink-search error.
        grid: number of shrink steps per unit (step 1/grid).
        max_shrink: the largest shrink tried (0.8 → p down to 0.21).
    """

    symmetric: bool = True
    search: str = "mse"
    norm: float = 2.4
    grid: int = 100
    max_shrink: float = 0.8

    def __post_init__(self) -> None:
        if self.search not in ("mse", "minmax"):
            raise ValueError(f"GridSpec.search must be 'mse' or 'minmax', found {self.search!r}")
        if self.grid < 1 or not 0.0 <= self.max_shrink < 1.0 or self.norm <= 0:
            raise ValueError(
                "GridSpec needs grid >= 1, 0 <= max_shrink < 1 and norm > 0, found "
                f"grid={self.grid}, max_shrink={self.max_shrink}, norm={self.norm}"
            )


@dataclass(frozen=True)
class QuantGrid:
    """A fitted per-row grid.

    Attributes:
        scale: (rows,) grid step, > 0.
        zero: (rows,) zero point, integer valued, in [0, 2^bits − 1].
        bits: bit-width.
    """

    scale: torch.Tensor
    zero: torch.Tensor
    bits: int

    @property
    def maxq(self) -> int:
        """The largest code, ``2^bits − 1``."""
        return 2**self.bits - 1

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Round x (rows, ...) onto the grid (dequantized values, x's dtype)."""
        return quantize(x, self.scale, self.zero, self.maxq)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Dequantized nearest grid point; ``scale``/``zero`` broadcast over x's trailing dims."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    s = scale.to(x.dtype).reshape(shape)
    z = zero.to(x.dtype).reshape(shape)
    q = torch.clamp(torch.round(x / s) + z, 0, maxq)
    return s * (q - z)


def _range_to_grid(
    xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if symmetric:
        amax = torch.maximum(xmin.abs(), xmax)
        amax = torch.where(amax > 0, amax, torch.ones_like(amax))
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        both0 = (xmin == 0) & (xmax == 0)
        xmin = torch.where(both0, -torch.ones_like(xmin), xmin)
        xmax = torch.where(both0, torch.ones_like(xmax), xmax)
        scale = (xmax - xmin) / maxq
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return scale, zero


def fit_grid(W: torch.Tensor, bits: int, spec: GridSpec | None = None) -> QuantGrid:
    """Fit one grid per row of W (rows, cols) at ``bits`` (2..8).

    Returns:
        The grid, in W's dtype and device.
    """
    check_bits(bits, allow_zero=False)
    spec = spec or GridSpec()
    maxq = 2**bits - 1
    x = W
    xmin = torch.clamp(x.min(dim=1).values, max=0)
    xmax = torch.clamp(x.max(dim=1).values, min=0)
    scale, zero = _range_to_grid(xmin, xmax, maxq, spec.symmetric)
    if spec.search == "minmax":
        return QuantGrid(scale, zero, bits)
    best = torch.full_like(scale, float("inf"))
    buf = torch.empty_like(x)
    for i in range(int(spec.max_shrink * spec.grid)):
        p = 1.0 - i / spec.grid
        s1, z1 = _range_to_grid(p * xmin, p * xmax, maxq, spec.symmetric)
        s_, z_ = s1[:, None], z1[:, None]
        # |quantize(x) − x|^norm in place (the same operations as :func:`quantize`)
        q = torch.div(x, s_, out=buf).round_().add_(z_).clamp_(0, maxq).sub_(z_).mul_(s_)
        err = q.sub_(x).abs_().pow_(spec.norm).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s1, scale)
        zero = torch.where(better, z1, zero)
    return QuantGrid(scale, zero, bits)
