"""Collect the layer Hessians ``H = 2·XᵀX/n`` of a model's compressible layers (DESIGN.md §2).

Forward hooks on every selected ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` see the layer inputs
of each calibration batch. ``X`` stacks the n input vectors of a layer as rows:

* Linear: the last dimension is the feature; every leading dimension (batch, sequence, ...) is
  flattened into rows, so a (B, T, d) input contributes B·T vectors of length d.
* Conv: the im2col ("unfold") patches with the layer's kernel, stride, dilation and padding
  ('same' included), one row per (image, output position), columns in the order of
  ``weight.flatten(1)``, i.e. (C_in/groups, kh, kw). A grouped or depthwise conv gets one H per
  group: group g's rows of the weight only ever see input channels
  g·C_in/groups ... (g+1)·C_in/groups − 1.

Moments are accumulated in float64 as running means merged batch by batch (Chan et al.'s pairwise
update of mean and centred scatter), so memory is bounded by the Hessians and one chunk of unfolded
inputs, whatever the number of batches. From them: ``H = 2·XᵀX/n`` by default, or the centred
``H_c = 2·(X−μ)ᵀ(X−μ)/n`` (ALGORITHMS.md §0.4) when ``centered=True``; the input mean μ is always
stored, for bias folding (:func:`bias_correction`).

Layers wider than ``max_dense_cols`` columns get a block-diagonal H over consecutive column blocks
of ``block_cols`` (e.g. CREPE-full's conv2 with 1024·64 = 65,536 columns): cross-block
correlations are dropped, each block can be solved on its own, and the per-row error of the layer
under that H is the sum of the per-block errors (see :meth:`LayerHessian.iter_blocks`).

Dead inputs and damping are not applied here:
:func:`automl_compress.solvers.hessian.prepare_hessian` does that in one shared place.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from automl_compress.attention import UnfusedMultiheadAttention
from automl_compress.database.tables import LayerInfo
from automl_compress.errors import InvalidInputError, NonFiniteError, ShapeMismatchError
from automl_compress.zoo.base import default_forward

__all__ = [
    "LayerHessian",
    "UnsupportedLayer",
    "bias_correction",
    "capture_hessians",
    "check_finite_weights",
    "locate_non_finite",
    "layer_weight_2d",
    "select_layers",
    "set_layer_weight_2d",
]

log = logging.getLogger(__name__)

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)

# Upper bound on the elements of one unfolded float64 chunk (≈256 MiB); larger inputs are split.
_CHUNK_ELEMS = 1 << 25


@dataclass(frozen=True)
class UnsupportedLayer:
    """A weight-holding module that the solvers cannot compress and that capture skipped.

    Attributes:
        name: module name in the model.
        type_name: the module's class name.
        reason: why it was skipped.
    """

    name: str
    type_name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({self.type_name}): {self.reason}"


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
        return int(self.H.shape[0])

    @property
    def blocked(self) -> bool:
        """True for the block-diagonal layout."""
        return self.block_cols is not None

    def group_rows(self, g: int) -> slice:
        """Weight rows (of :func:`layer_weight_2d`) that use group g's Hessian."""
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
                f"{tuple(W.shape)} and {tuple(W_hat.shape)}; use layer_weight_2d(module)"
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


# --------------------------------------------------------------------------------------------
# Weight helpers
# --------------------------------------------------------------------------------------------


def layer_weight_2d(module: nn.Module) -> torch.Tensor:
    """The (rows, cols) view of a layer's weight: ``weight.flatten(1)``, detached.

    For a grouped conv the rows of group g are ``g·rows/groups ... (g+1)·rows/groups − 1`` and
    their columns are that group's (C_in/groups, kh, kw) inputs (:meth:`LayerHessian.group_rows`).
    """
    _check_supported(module)
    return module.weight.detach().flatten(1)


def set_layer_weight_2d(module: nn.Module, W2d: torch.Tensor) -> None:
    """Copy a (rows, cols) weight back into the layer (dtype and device of the layer kept).

    Raises:
        ShapeMismatchError: W2d is not (rows, cols) of this layer.
        NonFiniteError: W2d holds NaN or Inf.
    """
    _check_supported(module)
    weight = module.weight
    expect = (weight.shape[0], math.prod(weight.shape[1:]))
    if tuple(W2d.shape) != expect:
        raise ShapeMismatchError(
            f"set_layer_weight_2d expected a {expect} weight for {type(module).__name__} with "
            f"weight shape {tuple(weight.shape)}, found {tuple(W2d.shape)}"
        )
    if not bool(torch.isfinite(W2d).all()):
        raise NonFiniteError(
            "set_layer_weight_2d got a weight with NaN or Inf; expected finite values, fix the "
            "solver output before writing it"
        )
    with torch.no_grad():
        weight.copy_(W2d.reshape(weight.shape).to(device=weight.device, dtype=weight.dtype))


def bias_correction(W: torch.Tensor, W_hat: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The bias update ``(W − Ŵ)·μ`` per row that folds a centred-H solve (ALGORITHMS.md §0.4).

    Adding it to the layer's bias keeps each output's mean over the calibration inputs unchanged.

    Args:
        W: (rows, cols) dense weights.
        W_hat: (rows, cols) compressed weights.
        mean: (cols,) or (groups, cols) input mean (``LayerHessian.mean``); with groups, row r
            uses ``mean[r // (rows / groups)]``.

    Returns:
        (rows,) float64 bias update.
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


# --------------------------------------------------------------------------------------------
# Layer selection
# --------------------------------------------------------------------------------------------


def _check_supported(module: nn.Module) -> None:
    if not isinstance(module, SUPPORTED):
        raise InvalidInputError(
            f"expected nn.Linear, nn.Conv1d or nn.Conv2d, found {type(module).__name__}"
        )


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_layers(
    model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()
) -> tuple[dict[str, nn.Module], list[UnsupportedLayer]]:
    """The compressible layers of a model, and the weight-holding modules that are not.

    A module is selected when its name matches an ``include`` glob and no ``exclude`` glob
    (``fnmatch`` on names from ``model.named_modules()``). Among the matched modules, those that
    own a weight of two or more dimensions but are not a supported layer (LSTM, Embedding,
    ConvTranspose, a conv with a non-zero padding mode, an ``nn.MultiheadAttention`` and the
    ``out_proj`` it uses functionally, ...) are returned in ``unsupported`` rather than dropped
    silently; normalisation layers (1-D weights only) are ignored. The projections of an
    :class:`~automl_compress.attention.UnfusedMultiheadAttention` (what
    :func:`~automl_compress.attention.unfuse_attention` makes of a MultiheadAttention) are
    ordinary Linear layers and are selected.

    Returns:
        ``(layers, unsupported)``: name → module in ``named_modules`` order, and the skipped ones.
    """
    include, exclude = tuple(include), tuple(exclude)
    layers: dict[str, nn.Module] = {}
    unsupported: list[UnsupportedLayer] = []
    mha_children: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            prefix = f"{name}." if name else ""
            mha_children.update(f"{prefix}{c}" for c, _ in module.named_children())
    for name, module in model.named_modules():
        if not _matches(name, include) or _matches(name, exclude):
            continue
        kind = type(module).__name__
        if isinstance(module, SUPPORTED):
            if name in mha_children:
                reason = "weights used functionally by MultiheadAttention (hooks never see them)"
                unsupported.append(UnsupportedLayer(name, kind, reason))
            elif not isinstance(module, nn.Linear) and module.padding_mode != "zeros":
                reason = f"padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
                unsupported.append(UnsupportedLayer(name, kind, reason))
            elif isinstance(module.weight, nn.parameter.UninitializedParameter):
                unsupported.append(UnsupportedLayer(name, kind, "lazy layer not initialised"))
            else:
                layers[name] = module
            continue
        if isinstance(module, nn.MultiheadAttention):
            reason = (
                "fused in_proj_weight; run the model through "
                "automl_compress.attention.unfuse_attention first (load_task does) to compress "
                "its q/k/v/out projections as Linear layers"
            )
            unsupported.append(UnsupportedLayer(name, kind, reason))
            continue
        if isinstance(module, UnfusedMultiheadAttention):
            continue  # its own parameters are bias vectors (bias_k / bias_v); projections above
        if any(p.dim() >= 2 for p in module.parameters(recurse=False)):
            unsupported.append(UnsupportedLayer(name, kind, "module type not supported"))
    return layers, unsupported


# --------------------------------------------------------------------------------------------
# Input vectors of one layer call
# --------------------------------------------------------------------------------------------


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    return "conv1d" if isinstance(module, nn.Conv1d) else "conv2d"


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


def _iter_input_chunks(module: nn.Module, x: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield (N, groups·cols) float64 chunks of the layer's input vectors X."""
    if isinstance(module, nn.Linear):
        X = x.reshape(-1, x.shape[-1])
        step = max(1, _CHUNK_ELEMS // max(1, X.shape[1]))
        for i in range(0, X.shape[0], step):
            yield X[i : i + step].to(torch.float64)
        return
    conv1d = isinstance(module, nn.Conv1d)
    spatial = 1 if conv1d else 2
    if x.dim() == spatial + 1:  # unbatched input
        x = x.unsqueeze(0)
    if conv1d:
        x = x.unsqueeze(2)
    pads = _conv_padding(module)
    if conv1d:
        pads = [(0, 0), *pads]
        kernel = (1, module.kernel_size[0])
        dilation = (1, module.dilation[0])
        stride = (1, module.stride[0])
    else:
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    flat_pad = [p for lr in reversed(pads) for p in lr]  # F.pad wants last dim first
    width = x.shape[1] * kernel[0] * kernel[1]
    positions = 1
    for i in range(2):
        size = x.shape[2 + i] + sum(pads[i])
        positions *= (size - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
    step = max(1, _CHUNK_ELEMS // max(1, positions * width))
    for i in range(0, x.shape[0], step):
        xc = x[i : i + step].to(torch.float64)
        if any(flat_pad):
            xc = F.pad(xc, flat_pad)
        cols = F.unfold(xc, kernel_size=kernel, dilation=dilation, stride=stride)
        yield cols.transpose(1, 2).reshape(-1, width)


# --------------------------------------------------------------------------------------------
# Streaming moments
# --------------------------------------------------------------------------------------------


class _Moments:
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


@dataclass
class _LayerState:
    name: str
    module: nn.Module
    moments: _Moments
    block_cols: int | None
    macs_total: float = 0.0
    items: int = 0
    order: int = -1
    last_batch: int = -1


def _layer_state(
    name: str, module: nn.Module, max_dense_cols: int, block_cols: int, device: torch.device
) -> _LayerState:
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
        warnings.warn(msg, stacklevel=3)
        log.info(msg)
        return _LayerState(name, module, _Moments(groups, cols, blocks, device), bc)
    return _LayerState(name, module, _Moments(groups, cols, [slice(0, cols)], device), None)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _finish(state: _LayerState, index: int, centered: bool) -> LayerHessian:
    module, m = state.module, state.moments
    groups, cols = m.groups, m.cols
    if state.block_cols is None:
        (H,) = m.hessian_blocks(centered)
    else:
        bc = state.block_cols
        H = torch.zeros(groups, len(m.blocks), bc, bc, dtype=torch.float64, device=m.mean.device)
        for k, Hk in enumerate(m.hessian_blocks(centered)):
            w = Hk.shape[1]
            H[:, k, :w, :w] = Hk
    if isinstance(module, nn.Linear):
        kernel: tuple[int, ...] = ()
        stride: tuple[int, ...] = ()
    else:
        kernel, stride = tuple(module.kernel_size), tuple(module.stride)
    info = LayerInfo(
        name=state.name,
        kind=_kind(module),
        rows=int(module.weight.shape[0]),
        cols=int(cols),
        kernel=kernel,
        stride=stride,
        groups=groups,
        macs=int(round(state.macs_total / max(1, state.items))),
        index=index,
        has_bias=module.bias is not None,
    )
    return LayerHessian(
        name=state.name,
        info=info,
        H=H,
        n_samples=m.n,
        mean=m.mean,
        centered=centered,
        block_cols=state.block_cols,
    )


# --------------------------------------------------------------------------------------------
# Non-finite values: which parameter, which module
# --------------------------------------------------------------------------------------------


def _describe_value(v: float) -> str:
    return "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")


def check_finite_weights(model: nn.Module) -> None:
    """Raise if any floating parameter or buffer of ``model`` holds NaN or Inf.

    Runs no forward. The message names the tensor and the index of its first bad entry in
    row-major order, e.g. ``conv2.weight[3, 1, 0, 2] is NaN``.

    Raises:
        NonFiniteError: the first non-finite parameter (then buffer), with its index.
    """
    for kind, items in (("parameter", model.named_parameters()),
                        ("buffer", model.named_buffers())):
        for name, t in items:
            if not (t.is_floating_point() or t.is_complex()):
                continue
            bad = ~torch.isfinite(t.detach())
            if not bool(bad.any()):
                continue
            idx = [int(i) for i in torch.nonzero(bad)[0]]
            where = f"{name}[{', '.join(map(str, idx))}]" if idx else name
            value = complex(t.detach()[tuple(idx)].item()) if t.is_complex() else float(
                t.detach()[tuple(idx)].item())
            what = "NaN or Inf" if isinstance(value, complex) else _describe_value(value)
            raise NonFiniteError(
                f"{kind} {where} is {what} ({int(bad.sum())} of {t.numel()} values of {name} "
                "are not finite); expected finite weights: the checkpoint or the training run "
                "produced them; fix or re-load the model's weights before compressing"
            )


def _first_tensor(x: Any) -> torch.Tensor | None:
    """The primary tensor of a module's input or output: the tensor itself, else the first one
    in a tuple / list / dict (in order)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        for v in x:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def _all_tensors(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _all_tensors(v)
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _all_tensors(v)


def _not_finite(t: torch.Tensor | None) -> bool:
    return (t is not None and t.is_floating_point() and not t.is_nested
            and not bool(torch.isfinite(t).all()))


class _Located(Exception):
    """Stops the diagnostic forward at the first non-finite value."""


class _NonFiniteInput(Exception):
    """A captured layer's input is not finite (raised inside the forward, handled by capture)."""

    def __init__(self, layer: str) -> None:
        super().__init__(layer)
        self.layer = layer


def locate_non_finite(
    model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Any] = default_forward
) -> str:
    """Run one batch with a hook on every module and say where values first went non-finite.

    Hooks fire in execution order: a module's pre-hook before its submodules run, its forward
    hook after. The first module whose primary output (the first tensor of its output) holds NaN
    or Inf while its primary input was finite is the culprit. When a module's primary input is
    already non-finite although every module before it returned finite values, an operation
    outside the modules (in the forward of the enclosing module) produced it; at the model's own
    input the calibration batch holds them. Masks passed beside the primary input (additive
    ``-inf`` masks are legal) are not inspected.

    Returns:
        One sentence naming the module (and its class), or saying that the forward stayed
        finite this time.
    """
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[nn.Module] = []
    found: list[str] = []

    def label(m: nn.Module) -> str:
        return f"{names.get(id(m)) or '<model>'!r} ({type(m).__name__})"

    def pre(m: nn.Module, args: tuple, kwargs: dict) -> None:
        if m is model:
            bad = [t for t in _all_tensors((args, kwargs)) if _not_finite(t)]
            if bad:
                found.append("the calibration batch itself holds NaN or Inf; clean the "
                             "calibration data")
                raise _Located
        elif _not_finite(_first_tensor(args) if args else _first_tensor(kwargs)):
            parent = stack[-1] if stack else model
            found.append(
                f"the input of {label(m)} is already non-finite while every module before it "
                f"returned finite values: an operation in the forward of {label(parent)} "
                "outside its submodules produced it"
            )
            raise _Located
        stack.append(m)

    def post(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if stack and stack[-1] is m:
            stack.pop()
        if _not_finite(_first_tensor(out)):
            inner = " (its submodules returned finite values, so an operation in its own " \
                    "forward produced it)" if any(True for _ in m.children()) else ""
            found.append(
                f"the first module whose output went non-finite is {label(m)}; its input was "
                f"finite{inner}: look for an overflow or an invalid operation (log or sqrt of a "
                "negative, division by zero) there"
            )
            raise _Located

    handles = []
    try:
        for m in model.modules():
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
        with torch.no_grad():
            forward(model, batch)
    except _Located:
        pass
    finally:
        for h in handles:
            h.remove()
    if found:
        return found[0]
    return ("re-running the batch with a hook on every module found no non-finite module "
            "output (the forward is not deterministic?)")


def capture_hessians(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] = default_forward,
    *,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    max_dense_cols: int = 16384,
    block_cols: int = 4096,
    centered: bool = False,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
) -> dict[str, LayerHessian]:
    """Run the calibration batches through the model and collect each layer's Hessian.

    The model runs in eval mode under ``torch.no_grad()`` on ``device`` (it is moved there for the
    capture and moved back, and its train/eval flags are restored); batches are moved to
    ``device``. Nothing in the model is changed. Unsupported weight-holding modules are skipped:
    call :func:`select_layers` to list them.

    Args:
        model: the dense model.
        batches: calibration batches (model inputs), consumed once.
        forward: ``forward(model, batch)`` runs one batch (default: ``model(batch)`` /
            ``model(*batch)`` / ``model(**batch)``).
        include: glob patterns of module names to capture.
        exclude: glob patterns of module names to skip.
        max_dense_cols: above this many columns per row, H is block-diagonal.
        block_cols: column-block width of the block-diagonal layout.
        centered: store the centred ``2·(X−μ)ᵀ(X−μ)/n`` instead of ``2·XᵀX/n``.
        device: where the forward runs and H is accumulated and returned.
        max_batches: use at most this many batches (None: all).

    Returns:
        name → :class:`LayerHessian`, in forward order (``info.index`` counts from 0). Selected
        layers that never ran in the forward are left out with a warning.

    Raises:
        InvalidInputError: no batches, no selected layer, or bad sizes.
        NonFiniteError: a parameter or buffer holds NaN or Inf (checked before any forward;
            the message names it and the index of its first bad entry), or a layer input does
            (the message names the layer and the first module whose output went non-finite,
            see :func:`locate_non_finite`).
    """
    if max_dense_cols < 1 or block_cols < 1:
        raise InvalidInputError(
            f"max_dense_cols and block_cols must be >= 1, found {max_dense_cols} and {block_cols}"
        )
    if max_batches is not None and max_batches < 1:
        raise InvalidInputError(f"max_batches must be >= 1 or None, found {max_batches}")
    device = torch.device(device)
    check_finite_weights(model)
    layers, _ = select_layers(model, include, exclude)
    if not layers:
        raise InvalidInputError(
            f"no Linear/Conv1d/Conv2d layer matches include={list(include)} "
            f"exclude={list(exclude)}; check the module names with model.named_modules()"
        )
    states = {
        name: _layer_state(name, module, max_dense_cols, block_cols, device)
        for name, module in layers.items()
    }
    seen: list[str] = []
    batch_index = [0]

    def make_hook(state: _LayerState) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            x = args[0] if args else kwargs["input"]
            if not bool(torch.isfinite(x).all()):
                raise _NonFiniteInput(state.name)
            if state.order < 0:
                state.order = len(seen)
                seen.append(state.name)
            for X in _iter_input_chunks(module, x.detach().to(device)):
                state.moments.update(X)
            spatial = 0 if isinstance(module, nn.Linear) else module.weight.dim() - 2
            batched = output.dim() >= spatial + 2
            # each output element is one dot product of length cols
            state.macs_total += float(output.numel()) * state.moments.cols
            if state.last_batch != batch_index[0]:  # count items once per batch (reused modules)
                state.items += int(output.shape[0]) if batched else 1
                state.last_batch = batch_index[0]

        return hook

    param = next(model.parameters(), None)
    home = param.device if param is not None else device
    flags = [(m, m.training) for m in model.modules()]
    handles = []
    n_batches = 0
    try:
        if home != device:
            model.to(device)
        model.eval()
        for state in states.values():
            handles.append(
                state.module.register_forward_hook(make_hook(state), with_kwargs=True)
            )
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and n_batches >= max_batches:
                    break
                batch_index[0] = n_batches
                moved = _to_device(batch, device)
                try:
                    forward(model, moved)
                except _NonFiniteInput as exc:
                    for h in handles:
                        h.remove()
                    handles.clear()
                    where = locate_non_finite(model, moved, forward)
                    raise NonFiniteError(
                        f"layer {exc.layer!r} received NaN or Inf inputs during Hessian capture "
                        f"(calibration batch {n_batches}): {where}"
                    ) from None
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for m, training in flags:
            m.training = training
        if home != device:
            model.to(home)
    if n_batches == 0:
        raise InvalidInputError(
            "capture_hessians got no calibration batches; expected an iterable of at least one "
            "model input (e.g. a list of tensors)"
        )
    missing = [n for n in states if states[n].order < 0]
    if missing:
        warnings.warn(
            f"layers never called in the forward pass were skipped: {missing}", stacklevel=2
        )
    return {name: _finish(states[name], i, centered) for i, name in enumerate(seen)}
