"""A tiny transformer task: sklearn's 8x8 digits as sequences of 8 pixel rows.

``EncoderClassifier``: a Linear embedding of each row, a two-layer ``nn.TransformerEncoder``
(batch_first, nested tensors enabled, so the eval fast path is live), mean pooling and a Linear
head; trained for 200 steps (under a second on one thread). Calibration: 4 batches of 64 training
images; metric: top-1 on 400 held-out images.
"""

from __future__ import annotations

import copy
import functools

import torch
from sklearn.datasets import load_digits
from torch import nn

from automl_compress.zoo.base import Task

WIDTH = 16


class EncoderClassifier(nn.Module):
    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        layer = nn.TransformerEncoderLayer(width, 2, dim_feedforward=2 * width, dropout=0.1,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


def _data():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0  # (n, 8 rows, 8 pixels)
    return x, torch.tensor(d.target, dtype=torch.int64)


@functools.lru_cache(maxsize=2)
def _trained(seed: int, steps: int) -> EncoderClassifier:
    x, y = _data()
    x_tr, y_tr = x[:-400], y[:-400]
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains faster on one thread
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = EncoderClassifier()
            opt = torch.optim.Adam(model.parameters(), lr=3e-3)
            model.train()
            for _ in range(steps):
                idx = torch.randint(0, len(x_tr), (64,), generator=gen)
                loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def make_task(seed: int = 0, steps: int = 200) -> Task:
    """The task factory (``task.name: _attention_task:make_task`` from the tests folder)."""
    x, y = _data()
    x_te, y_te = x[-400:], y[-400:]

    @torch.no_grad()
    def evaluate(m: nn.Module) -> float:
        m.eval()
        return float((m(x_te).argmax(dim=1) == y_te).float().mean())

    calib = [x[i * 64 : (i + 1) * 64] for i in range(4)]
    return Task(name="tests:attention", family="tiny_transformer",
                model=copy.deepcopy(_trained(seed, steps)), calib=calib, evaluate=evaluate,
                metric_name="top1")


def make_model() -> EncoderClassifier:
    """The trained model alone (``task.name`` with ``task.inputs``)."""
    return copy.deepcopy(_trained(0, 200))


def make_inputs(batches: int = 6) -> list[torch.Tensor]:
    """Input batches alone (``task.inputs``)."""
    x, _ = _data()
    return [x[i * 64 : (i + 1) * 64] for i in range(batches)]
