"""Distances between a model's outputs and the dense model's, with their curvature at zero.

Every calibrated objective (docs/objectives.md) and the fidelity metric of a task without labels
measure how far the compressed model's outputs ``y`` move from the dense outputs ``y₀``, per
calibration item, with no labels:

- ``kl``: classifiers (logits over the last dimension):
  ``D = Σ_classes p₀ (log p₀ − log p)``, ``p = softmax(y)``; curvature ``∇²D = diag(p₀) − p₀p₀ᵀ``.
- ``cosine``: embeddings (last dimension): ``D = 1 − cos(y, y₀)``;
  curvature ``∇²D = (I − ŷ₀ŷ₀ᵀ) / ‖y₀‖²`` with ``ŷ₀ = y₀/‖y₀‖``.
- ``mse``: anything else: ``D = Σ (y − y₀)²`` over all non-batch elements; ``∇²D = 2I``.

Leading dimensions between the batch and the last one (sequence positions) are summed. ``D`` is 0
with zero gradient at ``y = y₀``, so ``D(y₀ + Δ) ≈ ½ Δᵀ ∇²D Δ``. :meth:`Distance.probe` draws
random vectors ``v`` with ``E[v vᵀ] = ∇²D`` (a label sampled from ``p₀`` for ``kl``, projected or
scaled Gaussians otherwise); back-propagated through the model they give an unbiased estimate of
the diagonal Gauss-Newton matrix of ``D`` with respect to any layer's outputs (the ``fisher``
objective). :meth:`Distance.fidelity` is the per-item "higher is better" form used as a metric.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.nn.functional as F

from automl_compress.errors import InvalidInputError


class DistanceName(StrEnum):
    """The output distances a task can declare (``Task.distance``)."""

    KL = "kl"
    COSINE = "cosine"
    MSE = "mse"


def _flat_items(y: torch.Tensor) -> torch.Tensor:
    """(B, ..., d) → (B, m, d): items, the positions inside an item, the last dimension."""
    if y.dim() == 1:
        return y.reshape(-1, 1, 1)
    return y.reshape(y.shape[0], -1, y.shape[-1])


def _kl(y: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
    logp0 = F.log_softmax(_flat_items(y0).double(), dim=-1)
    logp = F.log_softmax(_flat_items(y).double(), dim=-1)
    return (logp0.exp() * (logp0 - logp)).sum(dim=(1, 2))


def _kl_probe(y0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    p0 = F.softmax(y0.detach().double(), dim=-1)
    flat = p0.reshape(-1, p0.shape[-1])
    draw = torch.multinomial(flat.cpu(), 1, generator=gen).to(p0.device)
    onehot = torch.zeros_like(flat).scatter_(1, draw, 1.0)
    return (flat - onehot).reshape(p0.shape)


def _cosine(y: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
    a, b = _flat_items(y).double(), _flat_items(y0).double()
    return (1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-12)).sum(dim=1)


def _cosine_probe(y0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    y0 = y0.detach().double()
    norm = y0.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    u = y0 / norm
    z = torch.randn(y0.shape, generator=gen, dtype=torch.float64).to(y0.device)
    return (z - u * (u * z).sum(dim=-1, keepdim=True)) / norm


def _mse(y: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
    d = (y.double() - y0.double()).reshape(y.shape[0], -1)
    return (d * d).sum(dim=1)


def _mse_probe(y0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    z = torch.randn(y0.shape, generator=gen, dtype=torch.float64).to(y0.device)
    return z * 2.0**0.5


def _energy(y0: torch.Tensor) -> torch.Tensor:
    e = y0.double().reshape(y0.shape[0], -1)
    return (e * e).sum(dim=1).clamp_min(1e-300)


@dataclass(frozen=True)
class Distance:
    """One output distance: its value per item, its curvature probe and its fidelity form.

    Attributes:
        name: the registry name.
        value: ``(y, y0) -> (B,)`` float64 distances per item.
        probe: ``(y0, generator) -> v`` with ``E[v vᵀ] = ∇²D`` at ``y = y0`` (same shape as y0).
        fidelity: ``(y, y0) -> (B,)`` per-item agreement, higher is better (0 or 1 when equal).
    """

    name: DistanceName
    value: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    probe: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    fidelity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


DISTANCES: dict[DistanceName, Distance] = {
    DistanceName.KL: Distance(DistanceName.KL, _kl, _kl_probe, lambda y, y0: -_kl(y, y0)),
    DistanceName.COSINE: Distance(
        DistanceName.COSINE, _cosine, _cosine_probe,
        lambda y, y0: 1.0 - _cosine(y, y0) / _flat_items(y0).shape[1]),
    DistanceName.MSE: Distance(DistanceName.MSE, _mse, _mse_probe,
                               lambda y, y0: -_mse(y, y0) / _energy(y0)),
}


def get_distance(name: str) -> Distance:
    """The distance registered under ``name``.

    Raises:
        InvalidInputError: an unknown name.
    """
    try:
        return DISTANCES[DistanceName(name)]
    except ValueError:
        raise InvalidInputError(
            f"unknown output distance {name!r}; expected one of "
            f"{[d.value for d in DistanceName]} (Task.distance)"
        ) from None


def output_tensor(out: object, where: str) -> torch.Tensor:
    """The model output as a floating tensor with a batch dimension.

    Raises:
        InvalidInputError: the output is not a floating tensor (e.g. a dict or a tuple): the
            distances need one tensor per batch.
    """
    if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.dim() < 1:
        found = type(out).__name__ if not isinstance(out, torch.Tensor) else \
            f"a {out.dtype} tensor of shape {tuple(out.shape)}"
        raise InvalidInputError(
            f"{where}: expected the model output to be one floating tensor with a batch "
            f"dimension, found {found}; give the task a forward function (Task.forward) that "
            "returns the output tensor (e.g. the logits)"
        )
    return out
