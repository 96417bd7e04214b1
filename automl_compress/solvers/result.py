"""The value every solver returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from automl_compress.solvers.hessian import row_errors


@dataclass(frozen=True)
class SolveResult:
    """A compressed layer and what it cost.

    Attributes:
        weight: (rows, cols) compressed weights, dequantized, same dtype and device as the input W.
        row_error: (rows,) float64 exact per-row error ``0.5 * (w - ŵ) H (w - ŵ)^T`` under the
            undamped H (equal to the mean squared output error of that row over the calibration
            inputs). ``None`` only for the data-free baselines called without ``H``.
        mask: (rows, cols) bool, True where a weight is kept; ``None`` for dense results.
        scale: (rows,) per-row grid step; ``None`` when not quantized.
        zero: (rows,) per-row zero point (integer valued, stored as float); ``None`` when not
            quantized.
        bits: the bit-width of the grid (0 = every row removed); ``None`` when not quantized.
        info: solver-specific extras (e.g. ``order`` and ``step_losses`` of a greedy pass,
            ``method``); never needed to rebuild ``weight``.
    """

    weight: torch.Tensor
    row_error: torch.Tensor | None
    mask: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    bits: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def error(self) -> float:
        """The layer error: the sum of ``row_error``."""
        if self.row_error is None:
            raise ValueError("this result was computed without H, so it has no error; pass H=")
        return float(self.row_error.sum())

    def codes(self) -> torch.Tensor:
        """Integer grid codes (rows, cols) as int16, ``round(ŵ / scale) + zero``.

        Raises:
            ValueError: if the result is not quantized.
        """
        if self.scale is None or self.zero is None or self.bits is None:
            raise ValueError("codes() needs a quantized result (scale, zero and bits are None)")
        w = self.weight.to(torch.float64)
        s = self.scale.to(torch.float64)[:, None]
        z = self.zero.to(torch.float64)[:, None]
        return (torch.round(w / s) + z).to(torch.int16)


def on_mask(
    W: torch.Tensor, H: torch.Tensor, pruned: SolveResult, quantized: SolveResult, method: str
) -> SolveResult:
    """A prune-then-quantize result: ``quantized``'s weights and grid on ``pruned``'s mask.

    Its ``row_error`` is against the dense W under the undamped H.
    """
    return SolveResult(
        quantized.weight,
        row_errors(W, quantized.weight, H),
        mask=pruned.mask,
        scale=quantized.scale,
        zero=quantized.zero,
        bits=quantized.bits,
        info={"method": method, "prune_error": pruned.row_error},
    )
