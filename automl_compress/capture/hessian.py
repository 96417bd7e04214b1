"""The captured Hessian of one layer (:class:`LayerHessian`) and the bias fold of a centred solve.

A :class:`LayerHessian` holds ``H`` in one of two layouts (dense per group, or block-diagonal over
column blocks for very wide layers), the input mean μ and the sample count; its
:meth:`~LayerHessian.iter_blocks` yields the independent (group, column block) problems the
solvers and the database work on. :func:`bias_correction` is the bias update ``(W − Ŵ)·μ`` that
makes a solve under the centred H exact for every output's mean (docs/solvers.md §1).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from automl_compress.errors import ShapeMismatchError
from automl_compress.specs import LayerInfo


@dataclass(frozen=True, eq=False)
class LayerHessian:
    """The captured Hessian of one layer.

    Two layouts of ``H`` (always float64):

    * dense (``block_cols is None``): ``H`` has shape (groups, cols, cols); group g's Hessian is
      ``H[g]`` and it applies to weight rows ``group_rows(g)``. Ordinary layers have groups = 1.
    * block-diagonal (``block_cols`` set, used when cols > ``max_dense_cols``): ``H`` has shape
      (groups, nblocks, block_cols, block_cols) with nblocks = ceil(cols / block_cols); block k
      covers columns ``k·block_cols : min((k+1)·block_cols, cols)``. When cols is not a multiple
      of block_cols the last block is zero-padded beyond its width; :meth:`iter_blocks` trims it.

    Attributes:
        name: module name in the model.
        info: shape metadata (kind, rows, cols, kernel, stride, groups, MACs, forward index, bias).
        H: the Hessian, ``2·XᵀX/n`` or the centred ``2·(X−μ)ᵀ(X−μ)/n``, in the layout above.
        n_samples: number n of input vectors (rows of X) per group.
        mean: (groups, cols) float64 input mean μ.
        centered: whether H is centred.
        block_cols: column-block width of the block-diagonal layout; None when dense.
    """

    name: str
    info: LayerInfo
    H: torch.Tensor
    n_samples: int
    mean: torch.Tensor
    centered: bool = False
    block_cols: int | None = None

    @property
    def groups(self) -> int:
        """Number of groups: the first dimension of ``H``."""
        return int(self.H.shape[0])

    @property
    def blocked(self) -> bool:
        """True for the block-diagonal layout."""
        return self.block_cols is not None

    def group_rows(self, g: int) -> slice:
        """Weight rows (of ``weight.flatten(1)``) that use group g's Hessian."""
        per = self.info.rows // self.groups
        return slice(g * per, (g + 1) * per)

    def iter_blocks(self) -> Iterator[tuple[int, slice, slice, torch.Tensor]]:
        """Yield ``(group, row slice, column slice, H block)`` for independent solves.

        The dense layout yields one block per group covering all columns. A solver that treats
        each yielded block as its own layer problem on ``W2d[rows, cols]`` gets per-row errors
        that add up over blocks (H is block-diagonal), so the layer error is their sum.
        """
        cols = self.info.cols
        for g in range(self.groups):
            rows = self.group_rows(g)
            if self.block_cols is None:
                yield g, rows, slice(0, cols), self.H[g]
                continue
            for k in range(self.H.shape[1]):
                start = k * self.block_cols
                stop = min(start + self.block_cols, cols)
                w = stop - start
                yield g, rows, slice(start, stop), self.H[g, k, :w, :w]

    def row_errors(self, W: torch.Tensor, W_hat: torch.Tensor) -> torch.Tensor:
        """Per-row error ``0.5·(w−ŵ) H (w−ŵ)ᵀ`` (float64, (rows,)) under this H.

        With the uncentred H this is each output channel's mean squared output change over the
        calibration inputs (bias unchanged); with the centred H it is the same after the bias
        update of :func:`bias_correction`.
        """
        expect = (self.info.rows, self.info.cols)
        if tuple(W.shape) != expect or tuple(W_hat.shape) != expect:
            raise ShapeMismatchError(
                f"layer {self.name!r}: W and W_hat must have the 2-D shape {expect}, found "
                f"{tuple(W.shape)} and {tuple(W_hat.shape)}; use module.weight.flatten(1)"
            )
        D = W.to(device=self.H.device, dtype=torch.float64) - W_hat.to(
            device=self.H.device, dtype=torch.float64
        )
        out = torch.zeros(self.info.rows, dtype=torch.float64, device=self.H.device)
        for _, rows, cols, Hb in self.iter_blocks():
            Db = D[rows, cols]
            out[rows] += 0.5 * ((Db @ Hb) * Db).sum(dim=1)
        return out

    def to(self, device: torch.device | str) -> LayerHessian:
        """A copy with H and mean on ``device``."""
        return replace(self, H=self.H.to(device), mean=self.mean.to(device))


def bias_correction(W: torch.Tensor, W_hat: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The bias update ``(W − Ŵ)·μ`` per row that folds a centred-H solve (docs/solvers.md §1).

    Adding it to the layer's bias keeps each output's mean over the calibration inputs unchanged.

    Args:
        W: (rows, cols) dense weights.
        W_hat: (rows, cols) compressed weights.
        mean: (cols,) or (groups, cols) input mean (``LayerHessian.mean``); with groups, row r
            uses ``mean[r // (rows / groups)]``.

    Returns:
        (rows,) float64 bias update.

    Raises:
        ShapeMismatchError: W and W_hat differ in shape, or the mean does not fit them.
    """
    if W.shape != W_hat.shape or W.dim() != 2:
        raise ShapeMismatchError(
            f"bias_correction expects W and W_hat of the same (rows, cols) shape, found "
            f"{tuple(W.shape)} and {tuple(W_hat.shape)}"
        )
    rows, cols = W.shape
    mu = mean.to(device=W.device, dtype=torch.float64)
    if mu.dim() == 1:
        mu = mu.unsqueeze(0)
    groups = mu.shape[0]
    if mu.shape[1] != cols or rows % groups:
        raise ShapeMismatchError(
            f"bias_correction: mean of shape {tuple(mean.shape)} does not fit W of shape "
            f"{(rows, cols)} (expected (cols,) or (groups, cols) with rows divisible by groups)"
        )
    D = (W.to(torch.float64) - W_hat.to(torch.float64)).view(groups, rows // groups, cols)
    return torch.einsum("grc,gc->gr", D, mu).reshape(rows)
