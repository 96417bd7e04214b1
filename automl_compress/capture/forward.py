"""Driving the calibration forward: :func:`capture_hessians` hooks the selected layers and runs.

The model is moved to the capture device and put in eval mode for the run, then put back; one
forward hook per selected layer feeds its input vectors into that layer's accumulator
(:mod:`automl_compress.capture.moments`). A layer input holding NaN or Inf stops the run, and one
more hooked forward of that batch (:func:`~automl_compress.capture.finite.locate_non_finite`) says
where the values first went non-finite.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from automl_compress.capture.finite import check_finite_weights, locate_non_finite
from automl_compress.capture.hessian import LayerHessian
from automl_compress.capture.moments import LayerState, finish, layer_state
from automl_compress.capture.select import select_layers
from automl_compress.errors import InvalidInputError, NonFiniteError
from automl_compress.specs import default_forward, to_device


class _NonFiniteInput(Exception):
    """A captured layer's input is not finite (raised inside the forward, handled by capture)."""

    def __init__(self, layer: str) -> None:
        super().__init__(layer)
        self.layer = layer


class _Hooks:
    """The forward hooks of one capture: every selected layer's state, in the order they ran.

    Attributes:
        states: name → accumulator of every selected layer.
        device: where the input vectors are accumulated.
        seen: names of the layers that ran, in forward order of their first call.
        batch: index of the calibration batch being run.
    """

    def __init__(self, states: dict[str, LayerState], device: torch.device) -> None:
        self.states, self.device = states, device
        self.seen: list[str] = []
        self.batch = 0
        self._handles: list[Any] = []

    def attach(self) -> None:
        for state in self.states.values():
            self._handles.append(
                state.module.register_forward_hook(self._hook(state), with_kwargs=True)
            )

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, state: LayerState) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            x = args[0] if args else kwargs["input"]
            if not bool(torch.isfinite(x).all()):
                raise _NonFiniteInput(state.name)
            if state.order < 0:
                state.order = len(self.seen)
                self.seen.append(state.name)
            state.record(x.detach().to(self.device), output, self.batch)

        return hook


def _check_sizes(max_dense_cols: int, block_cols: int, max_batches: int | None) -> None:
    if max_dense_cols < 1 or block_cols < 1:
        raise InvalidInputError(
            f"max_dense_cols and block_cols must be >= 1, found {max_dense_cols} and {block_cols}"
        )
    if max_batches is not None and max_batches < 1:
        raise InvalidInputError(f"max_batches must be >= 1 or None, found {max_batches}")


def _layer_states(
    model: nn.Module, include: Sequence[str], exclude: Sequence[str], max_dense_cols: int,
    block_cols: int, device: torch.device,
) -> dict[str, LayerState]:
    """An accumulator per selected layer (block-diagonal ones warn at capture's caller)."""
    layers, _ = select_layers(model, include, exclude)
    if not layers:
        raise InvalidInputError(
            f"no Linear/Conv1d/Conv2d layer matches include={list(include)} "
            f"exclude={list(exclude)}; check the module names with model.named_modules()"
        )
    states = {}
    for name, module in layers.items():
        states[name] = layer_state(name, module, max_dense_cols, block_cols, device, stacklevel=3)
    return states


@contextmanager
def _on_device_in_eval(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run the block with the model on ``device`` in eval mode; restore its place and flags."""
    param = next(model.parameters(), None)
    home = param.device if param is not None else device
    flags = [(m, m.training) for m in model.modules()]
    try:
        if home != device:
            model.to(device)
        model.eval()
        yield
    finally:
        for m, training in flags:
            m.training = training
        if home != device:
            model.to(home)


def _run_batches(
    model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any],
    device: torch.device, max_batches: int | None, hooks: _Hooks,
) -> int:
    """Run the calibration batches through the hooked model; returns how many ran.

    Raises:
        NonFiniteError: a hooked layer received NaN or Inf (the hooks are removed before the
            diagnostic forward of :func:`locate_non_finite`).
    """
    n_batches = 0
    with torch.no_grad():
        for batch in batches:
            if max_batches is not None and n_batches >= max_batches:
                break
            hooks.batch = n_batches
            moved = to_device(batch, device)
            try:
                forward(model, moved)
            except _NonFiniteInput as exc:
                hooks.detach()
                where = locate_non_finite(model, moved, forward)
                raise NonFiniteError(
                    f"layer {exc.layer!r} received NaN or Inf inputs during Hessian capture "
                    f"(calibration batch {n_batches}): {where}"
                ) from None
            n_batches += 1
    return n_batches


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
    call :func:`~automl_compress.capture.select.select_layers` to list them.

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
        name → :class:`~automl_compress.capture.hessian.LayerHessian`, in forward order
        (``info.index`` counts from 0). Selected layers that never ran in the forward are left
        out with a warning.

    Raises:
        InvalidInputError: no batches, no selected layer, or bad sizes.
        NonFiniteError: a parameter or buffer holds NaN or Inf (checked before any forward;
            the message names it and the index of its first bad entry), or a layer input does
            (the message names the layer and the first module whose output went non-finite,
            see :func:`~automl_compress.capture.finite.locate_non_finite`).
    """
    _check_sizes(max_dense_cols, block_cols, max_batches)
    device = torch.device(device)
    check_finite_weights(model)
    states = _layer_states(model, include, exclude, max_dense_cols, block_cols, device)
    hooks = _Hooks(states, device)
    with _on_device_in_eval(model, device):
        hooks.attach()
        try:
            n_batches = _run_batches(model, batches, forward, device, max_batches, hooks)
        finally:
            hooks.detach()
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
    return {name: finish(states[name], i, centered) for i, name in enumerate(hooks.seen)}
