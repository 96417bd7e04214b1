"""Hessian accumulation: a layer call's input vectors X, their streaming moments, the final H.

``X`` stacks the n input vectors of a layer as rows:

* Linear: the last dimension is the feature; every leading dimension (batch, sequence, ...) is
  flattened into rows, so a (B, T, d) input contributes B·T vectors of length d.
* Conv: the im2col ("unfold") patches with the layer's kernel, stride, dilation and padding
  ('same' included), one row per (image, output position), columns in the order of
  ``weight.flatten(1)``, i.e. (C_in/groups, kh, kw). A grouped or depthwise conv gets one H per
  group: group g's rows of the weight only ever see input channels
  g·C_in/groups ... (g+1)·C_in/groups − 1.

:class:`Moments` merges them batch by batch in float64 (Chan et al.'s pairwise update of mean and
centred scatter), so memory is bounded by the Hessians and one chunk of unfolded inputs (at most
:data:`CHUNK_ELEMS` elements), whatever the number of batches. :class:`LayerState` adds what one
layer's hook counts besides (MACs, items, forward order), and :func:`finish` turns it into a
:class:`~automl_compress.capture.hessian.LayerHessian`, dense or block-diagonal.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from automl_compress.capture.hessian import LayerHessian
from automl_compress.specs import LayerInfo

log = logging.getLogger("automl_compress.capture")

# Upper bound on the elements of one unfolded float64 chunk (≈256 MiB); larger inputs are split.
CHUNK_ELEMS = 1 << 25

# --------------------------------------------------------------------------------------------
# Input vectors of one layer call


def _conv_padding(module: nn.Conv1d | nn.Conv2d) -> list[tuple[int, int]]:
    """(left, right) zero padding per spatial dim, PyTorch's 'same' rule (extra on the right)."""
    ks, dil = module.kernel_size, module.dilation
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [(0, 0) for _ in ks]
        out = []
        for k, d in zip(ks, dil, strict=True):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    return [(int(p), int(p)) for p in module.padding]


def _linear_chunks(x: torch.Tensor) -> Iterator[torch.Tensor]:
    X = x.reshape(-1, x.shape[-1])
    step = max(1, CHUNK_ELEMS // max(1, X.shape[1]))
    for i in range(0, X.shape[0], step):
        yield X[i : i + step].to(torch.float64)


def _conv_geometry(module: nn.Conv1d | nn.Conv2d):
    """(pads, kernel, dilation, stride) of the conv as a 2-D one (a Conv1d gets a unit height)."""
    pads = _conv_padding(module)
    if isinstance(module, nn.Conv1d):
        pads = [(0, 0), *pads]
        kernel = (1, module.kernel_size[0])
        dilation = (1, module.dilation[0])
        stride = (1, module.stride[0])
        return pads, kernel, dilation, stride
    return pads, module.kernel_size, module.dilation, module.stride


def _conv_chunks(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> Iterator[torch.Tensor]:
    conv1d = isinstance(module, nn.Conv1d)
    spatial = 1 if conv1d else 2
    if x.dim() == spatial + 1:  # unbatched input
        x = x.unsqueeze(0)
    if conv1d:
        x = x.unsqueeze(2)
    pads, kernel, dilation, stride = _conv_geometry(module)
    flat_pad = [p for lr in reversed(pads) for p in lr]  # F.pad wants last dim first
    width = x.shape[1] * kernel[0] * kernel[1]
    positions = 1
    for i in range(2):
        size = x.shape[2 + i] + sum(pads[i])
        positions *= (size - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
    step = max(1, CHUNK_ELEMS // max(1, positions * width))
    for i in range(0, x.shape[0], step):
        xc = x[i : i + step].to(torch.float64)
        if any(flat_pad):
            xc = F.pad(xc, flat_pad)
        cols = F.unfold(xc, kernel_size=kernel, dilation=dilation, stride=stride)
        yield cols.transpose(1, 2).reshape(-1, width)


def iter_input_chunks(module: nn.Module, x: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield (N, groups·cols) float64 chunks of the layer's input vectors X."""
    if isinstance(module, nn.Linear):
        return _linear_chunks(x)
    return _conv_chunks(module, x)


# --------------------------------------------------------------------------------------------
# Streaming moments


class Moments:
    """Running mean and centred scatter (per sample) of grouped input vectors, float64.

    Holds, per group and column block, ``C = (X−μ)ᵀ(X−μ)/n`` and ``μ``; batches are merged with the
    pairwise update ``C = (n_a C_a + n_b C_b)/n + n_a n_b/n² · δδᵀ``, ``δ = μ_b − μ_a``.
    """

    def __init__(
        self, groups: int, cols: int, blocks: list[slice], device: torch.device
    ) -> None:
        self.groups, self.cols, self.blocks = groups, cols, blocks
        self.n = 0
        self.mean = torch.zeros(groups, cols, dtype=torch.float64, device=device)
        self.C = [
            torch.zeros(groups, b.stop - b.start, b.stop - b.start, dtype=torch.float64,
                        device=device)
            for b in blocks
        ]

    def update(self, X: torch.Tensor) -> None:
        """Add a batch of input vectors X to the running mean and scatter."""
        nb = X.shape[0]
        if nb == 0:
            return
        Xg = X.reshape(nb, self.groups, self.cols)
        mu_b = Xg.mean(dim=0)
        Xc = (Xg - mu_b).transpose(0, 1)  # (groups, nb, cols)
        n = self.n + nb
        delta = mu_b - self.mean
        wa, wb, wd = self.n / n, nb / n, self.n * nb / (n * n)
        for k, sl in enumerate(self.blocks):
            Xk = Xc[:, :, sl]
            dk = delta[:, sl]
            C = self.C[k]
            C.baddbmm_(Xk.transpose(1, 2), Xk, beta=wa, alpha=wb / nb)
            C.baddbmm_(dk.unsqueeze(2), dk.unsqueeze(1), alpha=wd)
        self.mean.add_(delta, alpha=wb)
        self.n = n

    def hessian_blocks(self, centered: bool) -> Iterator[torch.Tensor]:
        """Yield 2·C (centred) or 2·(C + μμᵀ) per block, each (groups, w, w), symmetrised.

        Consumes the accumulators: each is modified in place and released once its block is out.
        """
        for k, sl in enumerate(self.blocks):
            C = self.C[k]
            self.C[k] = torch.empty(0)
            if not centered:
                mk = self.mean[:, sl]
                C.baddbmm_(mk.unsqueeze(2), mk.unsqueeze(1))
            yield C + C.transpose(1, 2)  # = 2·C for a symmetric C
            del C


# --------------------------------------------------------------------------------------------
# One layer's accumulator and its LayerHessian


@dataclass
class LayerState:
    """What capture accumulates for one layer: its moments and the counts its hook keeps.

    Attributes:
        name: module name in the model.
        module: the layer.
        moments: the streaming moments of its input vectors.
        block_cols: column-block width of a block-diagonal H; None when dense.
        macs_total: multiply-accumulates summed over every call.
        items: input items seen (the batch dimension, once per calibration batch).
        order: position in forward order (-1 until the layer first runs).
        last_batch: the calibration batch its items were last counted in.
    """

    name: str
    module: nn.Module
    moments: Moments
    block_cols: int | None
    macs_total: float = 0.0
    items: int = 0
    order: int = -1
    last_batch: int = -1

    def record(self, x: torch.Tensor, output: torch.Tensor, batch: int) -> None:
        """Add one call of the layer: its input ``x`` (on the accumulation device) and output."""
        for X in iter_input_chunks(self.module, x):
            self.moments.update(X)
        spatial = 0 if isinstance(self.module, nn.Linear) else self.module.weight.dim() - 2
        batched = output.dim() >= spatial + 2
        # each output element is one dot product of length cols
        self.macs_total += float(output.numel()) * self.moments.cols
        if self.last_batch != batch:  # count items once per batch (reused modules)
            self.items += int(output.shape[0]) if batched else 1
            self.last_batch = batch


def layer_state(
    name: str, module: nn.Module, max_dense_cols: int, block_cols: int, device: torch.device,
    stacklevel: int = 2,
) -> LayerState:
    """A fresh accumulator for one layer.

    Block-diagonal (with a warning) above ``max_dense_cols`` columns (``stacklevel``: the warning's,
    counted from the caller).
    """
    groups = 1 if isinstance(module, nn.Linear) else int(module.groups)
    cols = math.prod(module.weight.shape[1:])
    if cols > max_dense_cols:
        bc = min(block_cols, cols)
        blocks = [slice(s, min(s + bc, cols)) for s in range(0, cols, bc)]
        msg = (
            f"layer {name!r}: {cols} input columns exceed max_dense_cols={max_dense_cols}; "
            f"using a block-diagonal H of {len(blocks)} blocks of {bc} columns (correlations "
            "across blocks are ignored; each block is solved on its own)"
        )
        warnings.warn(msg, stacklevel=stacklevel + 1)
        log.info(msg)
        return LayerState(name, module, Moments(groups, cols, blocks, device), bc)
    return LayerState(name, module, Moments(groups, cols, [slice(0, cols)], device), None)


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    return "conv1d" if isinstance(module, nn.Conv1d) else "conv2d"


def _hessian(state: LayerState, centered: bool) -> torch.Tensor:
    """H in the layout of :class:`LayerHessian` (consumes the moments)."""
    m = state.moments
    if state.block_cols is None:
        (H,) = m.hessian_blocks(centered)
        return H
    bc = state.block_cols
    H = torch.zeros(m.groups, len(m.blocks), bc, bc, dtype=torch.float64, device=m.mean.device)
    for k, Hk in enumerate(m.hessian_blocks(centered)):
        w = Hk.shape[1]
        H[:, k, :w, :w] = Hk
    return H


def _layer_info(state: LayerState, index: int) -> LayerInfo:
    module = state.module
    if isinstance(module, nn.Linear):
        kernel: tuple[int, ...] = ()
        stride: tuple[int, ...] = ()
    else:
        kernel, stride = tuple(module.kernel_size), tuple(module.stride)
    return LayerInfo(
        name=state.name,
        kind=_kind(module),
        rows=int(module.weight.shape[0]),
        cols=int(state.moments.cols),
        kernel=kernel,
        stride=stride,
        groups=state.moments.groups,
        macs=int(round(state.macs_total / max(1, state.items))),
        index=index,
        has_bias=module.bias is not None,
    )


def finish(state: LayerState, index: int, centered: bool) -> LayerHessian:
    """The layer's :class:`LayerHessian` (``index``: its forward position); consumes the state."""
    return LayerHessian(
        name=state.name,
        info=_layer_info(state, index),
        H=_hessian(state, centered),
        n_samples=state.moments.n,
        mean=state.moments.mean,
        centered=centered,
        block_cols=state.block_cols,
    )
