"""Score a stitched model: bias correction, BatchNorm re-estimation, then the held-out metric.

Statistics corrections change the ranking of assignments (ALGORITHMS.md §6.6), so every metric the
library reports is taken after them:

- bias correction: for each compressed layer, add the mean output change ``E[(W − Ŵ) x]`` over the
  calibration inputs *of the dense model* to the layer's bias (Nagel et al.'s correction; the exact
  in-solver form of the centred Hessian, ALGORITHMS.md §0.4). For a removed row this folds the
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

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from automl_compress.config import EvalConfig
from automl_compress.plan import CompressionPlan
from automl_compress.zoo.base import Task


def _delta_output(
    module: nn.Module, x: torch.Tensor, dW: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Per-output-channel sum of ``(W − Ŵ) x`` over a batch, and the number of outputs summed."""
    if isinstance(module, nn.Linear):
        y = F.linear(x, dW)
        return y.reshape(-1, y.shape[-1]).sum(dim=0), y.numel() // y.shape[-1]
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        y = module._conv_forward(x, dW, None)
        per = y.numel() // y.shape[1]
        return y.transpose(0, 1).reshape(y.shape[1], -1).sum(dim=1), per
    raise TypeError(f"bias correction supports Linear, Conv1d and Conv2d, found {type(module)}")


@torch.no_grad()
def bias_correct(
    dense: nn.Module, compressed: nn.Module, task: Task, names: Iterable[str]
) -> list[str]:
    """Fold the mean output change of each compressed layer into its bias (in place).

    Args:
        dense: the dense model (read only).
        compressed: the stitched copy; its biases are updated.
        task: gives the calibration batches and the forward function.
        names: the compressed layers.

    Returns:
        The names of the layers whose bias was corrected.
    """
    dmods = dict(dense.named_modules())
    cmods = dict(compressed.named_modules())
    names = [n for n in names if getattr(cmods[n], "bias", None) is not None]
    if not names:
        return []
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)
    dws = {}
    for n in names:
        wd, wc = dmods[n].weight, cmods[n].weight
        dws[n] = (wd.detach() - wc.detach().to(wd.device)).to(wd.dtype)

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple) -> None:
            s, c = _delta_output(module, inputs[0], dws[name])
            sums[name] = sums.get(name, 0) + s.to(torch.float64)
            counts[name] += c

        return fn

    handles = [dmods[n].register_forward_pre_hook(hook(n)) for n in names]
    was_training = dense.training
    dense.eval()
    try:
        for batch in task.calib:
            task.forward(dense, batch)
    finally:
        for h in handles:
            h.remove()
        dense.train(was_training)
    done = []
    for n in names:
        if counts[n]:
            b = cmods[n].bias
            b.add_((sums[n] / counts[n]).to(device=b.device, dtype=b.dtype))
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


def _bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def _bn_input_moments(
    model: nn.Module, task: Task, names: Iterable[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and (biased) variance of each named BN's input over the calibration
    batches, in float64, with the model in eval mode."""
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
def bn_shift(dense: nn.Module, compressed: nn.Module, task: Task) -> int:
    """Move each BN's pretrained statistics so its output moments match the dense model's.

    For each BN of ``compressed`` in forward order, r = σ̂/σ: ``m' = μ̂ − (μ − m)·r`` and
    ``v' = (v + ε)·r² − ε`` (input moments on the calibration batches; μ, σ² in ``dense``, μ̂, σ̂²
    in ``compressed`` with the earlier BNs already moved; m, v the running statistics). Then the
    BN's output has the dense output's per-channel mean and variance on the calibration data; a
    layer that compression left unchanged keeps its statistics. Channels whose dense input
    variance is zero use r = 1.

    Returns:
        The number of BatchNorm layers moved (0 leaves the model unchanged).
    """
    bns = _bn_layers(compressed)
    if not bns:
        return 0
    names = [n for n, _ in bns]
    ref = _bn_input_moments(dense, task, names)
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
    dense: nn.Module, compressed: nn.Module, task: Task, plan: CompressionPlan, cfg: EvalConfig
) -> nn.Module:
    """Apply the configured statistics corrections to a stitched model (in place) and return it."""
    if cfg.bias_correction:
        bias_correct(dense, compressed, task, plan.layers.keys())
    if cfg.bn_reestimate == "relative":
        bn_shift(dense, compressed, task)
    elif cfg.bn_reestimate == "reset":
        bn_reestimate(compressed, task)
    return compressed.eval()


@torch.no_grad()
def metric(model: nn.Module, task: Task) -> float:
    """The task metric on the held-out split (model in eval mode)."""
    model.eval()
    return float(task.evaluate(model))
