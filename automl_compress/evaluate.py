"""Score a stitched model: bias correction, BatchNorm re-estimation, then the held-out metric.

Statistics corrections change the ranking of assignments (docs/objectives.md §5), so every metric
the library reports is taken after them:

- bias correction: for each compressed layer, add the mean output change ``E[(W − Ŵ) x]`` over the
  calibration inputs *of the dense model* to the layer's bias (Nagel et al.'s correction; the exact
  in-solver form of the centred Hessian, docs/solvers.md §1). For a removed row this folds the
  channel's mean output into its bias. Layers without a bias are left to BN re-estimation.
- BatchNorm re-estimation, ``eval.bn_reestimate``:

  - ``relative`` (default): keep the pretrained statistics and move them by what compression
    changes, measured on the calibration batches, so that each BN's *output* has the dense
    model's per-channel mean and variance there. For each BN in forward order, with μ, σ² the
    per-channel mean and variance of its input in the dense model, μ̂, σ̂² in the compressed one
    (earlier BNs already moved), r = σ̂/σ, m, v the pretrained running statistics and ε the BN's
    eps: ``m' = μ̂ − (μ − m)·r`` and ``v' = (v + ε)·r² − ε``. A model whose calibration data
    differ from its training data (CREPE on synthetic tones) keeps its accuracy where
    compression changes nothing; ``reset`` costs crepe_tiny 3.7 points of pitch accuracy even
    uncompressed (0.9531 → 0.9160; docs/benchmarks.md, Allocators).
  - ``reset``: reset running statistics and forward the calibration batches with only the BN
    layers in train mode and a cumulative average (momentum None), back to eval (OBC's
    re-estimation; right when calibration comes from the training distribution).
  - ``off``.

The metric comes from ``Task.evaluate`` on the task's held-out split, which calibration never saw.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from automl_compress.config import EvalConfig
from automl_compress.plan import CompressionPlan
from automl_compress.specs import Task

_CORRECTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class DenseStats:
    """What the corrections need from the dense model, measured once per task.

    Attributes:
        input_sums: per layer with a bias, its calibration inputs summed over everything the
            weight is shared across (Linear: all leading dims, a (d,) vector; Conv: the batch,
            one (1, C, ...) tensor per input shape), each with the number of outputs per channel
            it stands for. ``x ↦ (W − Ŵ) x`` is linear, so the mean output change is ``W − Ŵ``
            applied to the sums, divided by the total count.
        bn_moments: per BatchNorm, the mean and (biased) variance of its input.
    """

    input_sums: dict[str, list[tuple[torch.Tensor, int]]]
    bn_moments: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _sum_inputs(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A batch's input summed over what the weight is shared across.

    Also the number of outputs per channel that sum stands for.
    """
    x = x.detach().to(torch.float64)
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).sum(dim=0), x.numel() // x.shape[-1]
    w = module.weight.detach().to(torch.float64)
    positions = module._conv_forward(x[:1], w, None).shape[2:].numel()
    return x.sum(dim=0, keepdim=True), x.shape[0] * positions


def _delta_sum(module: nn.Module, total: torch.Tensor, dW: torch.Tensor) -> torch.Tensor:
    """Per-output-channel sum of ``(W − Ŵ) x`` from a :func:`_sum_inputs` sum."""
    if isinstance(module, nn.Linear):
        return dW @ total
    y = module._conv_forward(total, dW, None)
    return y.reshape(y.shape[1], -1).sum(dim=1)


@torch.no_grad()
def dense_stats(dense: nn.Module, task: Task) -> DenseStats:
    """One pass of the dense model over the calibration batches.

    It records the input sums of every Linear / Conv1d / Conv2d with a bias and the input moments of
    every tracked BatchNorm.
    """
    mods = dict(dense.named_modules())
    layers = [n for n, m in mods.items()
              if isinstance(m, _CORRECTABLE) and getattr(m, "bias", None) is not None]
    sums: dict[str, dict[tuple, list]] = {n: {} for n in layers}

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple) -> None:
            total, count = _sum_inputs(module, inputs[0])
            acc = sums[name].setdefault(tuple(total.shape), [0, 0])
            acc[0], acc[1] = acc[0] + total, acc[1] + count

        return fn

    was_training = dense.training
    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in layers]
    try:
        bn = _bn_input_moments(dense, task, [n for n, _ in bn_layers(dense)])
    finally:
        for h in handles:
            h.remove()
        dense.train(was_training)
    return DenseStats({n: [(t, c) for t, c in acc.values()] for n, acc in sums.items() if acc},
                      bn)


@torch.no_grad()
def bias_correct(
    dense: nn.Module, compressed: nn.Module, task: Task, names: Iterable[str],
    stats: DenseStats | None = None,
) -> list[str]:
    """Fold the mean output change of each compressed layer into its bias (in place).

    Args:
        dense: the dense model (read only).
        compressed: the stitched copy; its biases are updated.
        task: gives the calibration batches and the forward function.
        names: the compressed layers.
        stats: :func:`dense_stats` of ``dense`` on ``task`` (measured here when None).

    Returns:
        The names of the layers whose bias was corrected.
    """
    dmods = dict(dense.named_modules())
    cmods = dict(compressed.named_modules())
    names = [n for n in names if getattr(cmods[n], "bias", None) is not None]
    if not names:
        return []
    for n in names:
        if not isinstance(dmods[n], _CORRECTABLE):
            raise TypeError(f"bias correction supports Linear, Conv1d and Conv2d, found "
                            f"{type(dmods[n]).__name__} at {n!r}")
    stats = dense_stats(dense, task) if stats is None else stats
    done = []
    for n in names:
        parts = stats.input_sums.get(n, [])
        count = sum(c for _, c in parts)
        if not count:
            continue
        wd, b = dmods[n].weight, cmods[n].bias
        dW = wd.detach().to(torch.float64) - cmods[n].weight.detach().to(wd.device, torch.float64)
        delta = sum(_delta_sum(dmods[n], t.to(wd.device), dW) for t, _ in parts)
        b.add_((delta / count).to(device=b.device, dtype=b.dtype))
        done.append(n)
    return done


@torch.no_grad()
def bn_reestimate(model: nn.Module, task: Task) -> int:
    """Re-estimate every BatchNorm's running statistics on the calibration batches (in place).

    Returns:
        The number of BatchNorm layers re-estimated (0 leaves the model unchanged).
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    model.eval()
    saved = []
    for m in bns:
        saved.append(m.momentum)
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches
        m.train()
    try:
        for batch in task.calib:
            task.forward(model, batch)
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom
        model.eval()
    return len(bns)


def bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The named BatchNorm layers of ``model`` that track running statistics."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def _bn_input_moments(
    model: nn.Module, task: Task, names: Iterable[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and (biased) variance of each named BN's input.

    Over the calibration batches, in float64, with the model in eval mode.
    """
    mods = dict(model.named_modules())
    acc: dict[str, list] = {}

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach().to(torch.float64)
            x = x.transpose(0, 1).reshape(x.shape[1], -1)
            a = acc.setdefault(name, [0, 0.0, 0.0])
            a[0] += x.shape[1]
            a[1] = a[1] + x.sum(dim=1)
            a[2] = a[2] + (x * x).sum(dim=1)

        return fn

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    model.eval()
    try:
        for batch in task.calib:
            task.forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, (count, s1, s2) in acc.items():
        mean = s1 / count
        out[n] = (mean, (s2 / count - mean * mean).clamp_min(0.0))
    return out


@torch.no_grad()
def bn_shift(dense: nn.Module, compressed: nn.Module, task: Task,
             stats: DenseStats | None = None) -> int:
    """Move each BN's pretrained statistics so its output moments match the dense model's.

    For each BN of ``compressed`` in forward order, r = σ̂/σ: ``m' = μ̂ − (μ − m)·r`` and
    ``v' = (v + ε)·r² − ε`` (input moments on the calibration batches; μ, σ² in ``dense``, μ̂, σ̂²
    in ``compressed`` with the earlier BNs already moved; m, v the running statistics). Then the
    BN's output has the dense output's per-channel mean and variance on the calibration data; a
    layer that compression left unchanged keeps its statistics. Channels whose dense input
    variance is zero use r = 1. ``stats`` (:func:`dense_stats`) supplies the dense moments;
    they are measured here when None.

    Returns:
        The number of BatchNorm layers moved (0 leaves the model unchanged).
    """
    bns = bn_layers(compressed)
    if not bns:
        return 0
    names = [n for n, _ in bns]
    ref = stats.bn_moments if stats is not None else _bn_input_moments(dense, task, names)
    for name, bn in bns:
        if name not in ref:  # not reached by the calibration forward
            continue
        mu, var = ref[name]
        mu_c, var_c = _bn_input_moments(compressed, task, [name])[name]
        r2 = torch.where(var > 0, var_c / var.clamp_min(1e-300), torch.ones_like(var))
        rm, rv = bn.running_mean, bn.running_var
        m, v = rm.to(torch.float64).cpu(), rv.to(torch.float64).cpu()
        new_m = mu_c - (mu - m) * r2.sqrt()
        new_v = ((v + bn.eps) * r2 - bn.eps).clamp_min(0.0)
        rm.copy_(new_m.to(device=rm.device, dtype=rm.dtype))
        rv.copy_(new_v.to(device=rv.device, dtype=rv.dtype))
    compressed.eval()
    return len(bns)


def correct(
    dense: nn.Module, compressed: nn.Module, task: Task, plan: CompressionPlan, cfg: EvalConfig,
    stats: DenseStats | None = None,
) -> nn.Module:
    """Apply the configured statistics corrections to a stitched model (in place) and return it.

    ``stats`` (:func:`dense_stats`, measured once per task by the caller) saves the dense pass
    over the calibration batches; without it the corrections measure what they need.
    """
    if stats is None and (cfg.bias_correction or cfg.bn_reestimate == "relative"):
        stats = dense_stats(dense, task)
    if cfg.bias_correction:
        bias_correct(dense, compressed, task, plan.layers.keys(), stats)
    if cfg.bn_reestimate == "relative":
        bn_shift(dense, compressed, task, stats)
    elif cfg.bn_reestimate == "reset":
        bn_reestimate(compressed, task)
    return compressed.eval()


@torch.no_grad()
def metric(model: nn.Module, task: Task) -> float:
    """The task metric on the held-out split (model in eval mode)."""
    model.eval()
    return float(task.evaluate(model))
