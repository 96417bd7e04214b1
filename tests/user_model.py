"""A user-style model given by dotted path (``task.name: user_model:make_task``).

What a new user brings, with the traits that break uncalibrated allocators: a depthwise conv and a
grouped conv, each followed by BatchNorm (which rescales exactly the channels whose pre-BN error
looks small), an ``nn.TransformerEncoder`` block over the conv features as tokens, and a Linear
head. Trained in-process for a few seconds on scikit-learn's 8×8 digits (upsampled to 16×16),
once per process and setting.

Splits (fixed by the seed, disjoint): 400 test images (the reported metric), 300 validation
images (what searches select on), the rest for training; the 256 calibration images are a subset
of the training split. The metric is top-1 accuracy; the task's output distance is the KL
divergence of the softmax outputs (a classifier).

Use it from the repo root with ``PYTHONPATH=tests`` (the test suite puts tests/ on the path).
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from automl_compress.zoo.base import ItemMetric, Task

N_TEST, N_VAL = 400, 300


class UserNet(nn.Module):
    """stem conv → depthwise conv → grouped conv (each with BN) → transformer block → head."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Conv2d(1, w, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(w)
        self.dw = nn.Conv2d(w, w, 3, padding=1, groups=w, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.gc = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(2 * w)
        layer = nn.TransformerEncoderLayer(2 * w, nhead=4, dim_feedforward=4 * w, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(2 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.dw(x)))
        x = F.relu(self.bn2(self.gc(x)))  # (B, 2w, 8, 8)
        tokens = F.avg_pool2d(x, 2).flatten(2).transpose(1, 2)  # (B, 16, 2w)
        return self.head(self.encoder(tokens).mean(dim=1))


def _data(seed: int):
    X, y = load_digits(return_X_y=True)
    x = torch.from_numpy(X.astype(np.float32) / 16.0).view(-1, 1, 8, 8)
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    perm = np.random.default_rng(seed).permutation(len(y))
    test, val, train = perm[:N_TEST], perm[N_TEST:N_TEST + N_VAL], perm[N_TEST + N_VAL:]
    return x, torch.from_numpy(y).long(), np.sort(test), np.sort(val), np.sort(train)


@functools.lru_cache(maxsize=4)
def _trained(seed: int, epochs: int) -> UserNet:
    x, y, _, _, train = _data(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights whatever the caller's thread count
    try:
        return _train(x, y, train, seed, epochs)
    finally:
        torch.set_num_threads(threads)


def _train(x, y, train, seed: int, epochs: int) -> UserNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UserNet()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            order = torch.from_numpy(train)[torch.randperm(len(train), generator=gen)]
            for idx in order.split(64):
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return model.eval()


def _top1(model: nn.Module, batch) -> torch.Tensor:
    images, labels = batch
    return (model(images).argmax(dim=1) == labels).double()


def make_task(seed: int = 0, epochs: int = 6, calib_samples: int = 256) -> Task:
    """The user-style task: UserNet on digits, top-1 on the test split, validation split apart."""
    x, y, test, val, train = _data(seed)
    model = copy.deepcopy(_trained(seed, epochs))
    calib_idx = np.sort(np.random.default_rng(seed + 1).choice(train, calib_samples,
                                                               replace=False))
    calib = list(x[calib_idx].split(64))

    def split(idx):
        return list(zip(x[idx].split(100), y[idx].split(100), strict=True))

    test_metric = ItemMetric(split(test), _top1)
    return Task(name="user_model", family="user_model", model=model, calib=calib,
                evaluate=test_metric, metric_name="top1", validate=ItemMetric(split(val), _top1),
                distance="kl")
