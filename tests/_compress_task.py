"""A tiny real task for the database / stitch / export / pipeline tests.

A small CNN (a BatchNorm conv without bias, a grouped conv with bias, two Linear layers) trained for
a few hundred steps on scikit-learn's 8x8 digits; calibration = 4 batches of training images,
metric = top-1 accuracy on 400 test images; 200 validation images apart (neither trained nor
calibrated on). Builds in about a second.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import torch
from sklearn.datasets import load_digits
from torch import nn

from automl_compress.zoo.base import ItemMetric, Task

#: A YAML config of this task with a small menu and the fast solvers, for the CLI tests (this
#: folder must be on ``sys.path`` for the task to load).
TINY_YAML = """\
task:
  name: _compress_task:make_task
menu:
  bits: [0, 2, 4, 8]
  patterns: [dense, '2:4']
solver:
  quant: gptq
"""


class TinyNet(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(8 * width, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.pool(x).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def _data():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    return x, y


def make_model(width: int = 8, seed: int = 0, train_steps: int = 150) -> TinyNet:
    """A trained TinyNet (trained once per process and setting, then copied)."""
    return copy.deepcopy(_trained(width, seed, train_steps))


@functools.lru_cache(maxsize=8)
def _trained(width: int, seed: int, train_steps: int) -> TinyNet:
    x, y = _data()
    x_tr, y_tr = x[:-600], y[:-600]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TinyNet(width)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(train_steps):
        idx = torch.randint(0, len(x_tr), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def make_task(
    width: int = 8, seed: int = 0, train_steps: int = 150, calib_batches: int = 4
) -> Task:
    x, y = _data()
    model = make_model(width, seed, train_steps)
    x_te, y_te = x[-400:], y[-400:]
    calib = [x[i * 64 : (i + 1) * 64] for i in range(calib_batches)]

    @torch.no_grad()
    def evaluate(m: nn.Module) -> float:
        m.eval()
        return float((m(x_te).argmax(dim=1) == y_te).float().mean())

    @torch.no_grad()
    def report(m: nn.Module) -> dict[str, float]:
        m.eval()
        top3 = m(x_te).topk(3, dim=1).indices
        return {"top3": float((top3 == y_te[:, None]).any(dim=1).float().mean())}

    return Task(
        name="tests:tiny", family="tiny_cnn", model=model, calib=calib, evaluate=evaluate,
        metric_name="top1", report=report,
        validate=ItemMetric([(x[-600:-500], y[-600:-500]), (x[-500:-400], y[-500:-400])], _top1),
        distance="kl",
    )


def make_no_grad_task() -> Task:
    """:func:`make_task` whose forward disables gradients (so ``fisher`` cannot be computed)."""

    def forward(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(batch)

    return dataclasses.replace(make_task(), forward=forward)


def _top1(m: nn.Module, batch) -> torch.Tensor:
    images, labels = batch
    return (m(images).argmax(dim=1) == labels).double()


def tiny_config(*overrides: str):
    """A small menu and the fast solver, so a database builds in seconds."""
    from automl_compress.config import load_config

    base = [
        "menu.bits=[0, 2, 4, 8]",
        "menu.patterns=[dense, '2:4', '50%']",
        "solver.quant=gptq",
        "device=cpu",
    ]
    return load_config(None, base + list(overrides))
