"""Non-finite values: which parameter, or which module of a forward, first holds NaN or Inf.

:func:`check_finite_weights` inspects the parameters and buffers without a forward (capture runs
it first); :func:`locate_non_finite` re-runs one batch with a hook on every module to name the
first one whose output went non-finite, for the message of a capture that met NaN or Inf inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from automl_compress.errors import NonFiniteError
from automl_compress.specs import default_forward


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
    """The primary tensor of a module's input or output.

    The tensor itself, else the first one in a tuple / list / dict (in order).
    """
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
