"""``digits_cnn`` / ``digits_cnn_wide``: a small CNN on scikit-learn's bundled 8×8 digits.

Data: ``sklearn.datasets.load_digits`` (1,797 images, shipped with scikit-learn), upsampled to 16×16
(bilinear) and standardised with the training split's mean and standard deviation. Splits are
fixed by the seed and disjoint: a test split (20 %) that only reports, a validation split (15 %)
that the searches select on, the training split (the rest), and the calibration set, a random
subset of the training split (post-training calibration on training images, as OBC/GPTQ do).
Neither training nor calibration sees the test or validation images. The metric is top-1
accuracy.

Model: three 3×3 Conv2d + BatchNorm + ReLU blocks (the last two with stride 2) and two Linear
layers, trained in-process (AdamW with a OneCycle schedule and one-pixel random shifts, fixed
seed). The weights are cached in ``cache_dir`` under a name keyed by a hash of every
hyperparameter; writes are atomic, and an unreadable or mismatched cache file is retrained with a
warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from automl_compress.errors import InvalidInputError
from automl_compress.io import atomic_write_bytes
from automl_compress.zoo.base import ItemMetric, Task

FAMILY = "digits_cnn"
CACHE_VERSION = 2  # 2: the validation split left the training split
IMAGE_SIZE = 16
TEST_FRACTION = 0.2
VAL_FRACTION = 0.15


class DigitsCNN(nn.Module):
    """conv1-bn1 → conv2-bn2 (stride 2) → conv3-bn3 (stride 2) → fc1 → fc2 on 1×16×16 images."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64), hidden: int = 64) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.conv3 = nn.Conv2d(c2, c3, 3, stride=2, padding=1)
        self.bn3 = nn.BatchNorm2d(c3)
        self.fc1 = nn.Linear(c3 * (IMAGE_SIZE // 4) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The class logits of a batch of images."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@dataclass(frozen=True)
class DigitsHParams:
    """Everything that determines the trained weights (the cache key hashes all of it)."""

    widths: tuple[int, int, int] = (16, 32, 64)
    hidden: int = 64
    seed: int = 0
    epochs: int = 12
    batch_size: int = 64
    lr: float = 0.01
    weight_decay: float = 1e-4
    version: int = CACHE_VERSION

    def key(self) -> str:
        """The cache key: a hash of every field."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class DigitsData:
    """Standardised 16×16 images and labels with fixed, disjoint index splits."""

    images: torch.Tensor
    labels: torch.Tensor
    train: np.ndarray
    calib: np.ndarray
    test: np.ndarray
    val: np.ndarray


def digits_data(seed: int = 0, calib_samples: int = 256) -> DigitsData:
    """Load, upsample and split the digits (test, val and train disjoint, calib ⊂ train).

    Raises:
        InvalidInputError: calib_samples outside 1..len(train).
    """
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    imgs = torch.from_numpy(X.astype(np.float32) / 16.0).view(-1, 1, 8, 8)
    imgs = F.interpolate(imgs, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    n_test = int(round(TEST_FRACTION * len(y)))
    n_val = int(round(VAL_FRACTION * len(y)))
    test, val = np.sort(perm[:n_test]), np.sort(perm[n_test:n_test + n_val])
    train = np.sort(perm[n_test + n_val:])
    if not 1 <= calib_samples <= len(train):
        raise InvalidInputError(
            f"calib_samples must be in 1..{len(train)} (the training split), found {calib_samples}"
        )
    calib = np.sort(rng.choice(train, size=calib_samples, replace=False))
    mean, std = imgs[train].mean(), imgs[train].std()
    imgs = (imgs - mean) / std
    return DigitsData(imgs, torch.from_numpy(y).long(), train, calib, test, val)


def _train(hp: DigitsHParams, data: DigitsData) -> DigitsCNN:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hp.seed)
        model = DigitsCNN(hp.widths, hp.hidden)
        gen = torch.Generator().manual_seed(hp.seed)
        x, y = data.images[data.train], data.labels[data.train]
        steps = (len(y) + hp.batch_size - 1) // hp.batch_size
        opt = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=hp.lr, epochs=hp.epochs, steps_per_epoch=steps
        )
        model.train()
        for _ in range(hp.epochs):
            order = torch.randperm(len(y), generator=gen)
            for i in range(steps):
                idx = order[i * hp.batch_size : (i + 1) * hp.batch_size]
                xb = x[idx]
                # one-pixel random shifts: cheap augmentation for the 16×16 images
                dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
                xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
                loss = F.cross_entropy(model(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


def _load_cached(path: Path, hp: DigitsHParams) -> DigitsCNN | None:
    if not path.exists():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if json.loads(meta.get("hparams", "null")) != json.loads(
                json.dumps(asdict(hp), sort_keys=True)
            ):
                raise ValueError("hyperparameters in the file do not match its name")
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        model = DigitsCNN(hp.widths, hp.hidden)
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # any unreadable/mismatched file is retrained
        warnings.warn(
            f"digits cache file {path} could not be read ({type(exc).__name__}: {exc}); "
            "retraining and overwriting it",
            stacklevel=3,
        )
        return None
    return model.eval()


def _save_cached(path: Path, hp: DigitsHParams, model: nn.Module) -> None:
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"hparams": json.dumps(asdict(hp), sort_keys=True)}
    atomic_write_bytes(path, save(state, metadata=meta))


def trained_model(hp: DigitsHParams, data: DigitsData, cache_dir: Path | None) -> DigitsCNN:
    """The trained CNN, from ``cache_dir`` when a valid file is there, else trained and cached."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{FAMILY}-{hp.key()}.safetensors"
        model = _load_cached(path, hp)
        if model is not None:
            return model
    model = _train(hp, data)
    if path is not None:
        _save_cached(path, hp, model)
    return model


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 512):
    """Top-1 accuracy of ``model`` (run in eval mode, mode restored) on its own device."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.no_grad():
            for i in range(0, len(labels), batch):
                logits = model(images[i : i + batch].to(device))
                correct += int((logits.argmax(1).cpu() == labels[i : i + batch]).sum())
    finally:
        model.train(was_training)
    return correct / len(labels)


def _task(
    name: str,
    hp: DigitsHParams,
    cache_dir: str | Path | None,
    calib_samples: int,
    calib_batch_size: int,
) -> Task:
    if calib_batch_size < 1:
        raise InvalidInputError(f"calib_batch_size must be >= 1, found {calib_batch_size}")
    data = digits_data(hp.seed, calib_samples)
    model = trained_model(hp, data, Path(cache_dir) if cache_dir is not None else None)
    calib_x = data.images[data.calib]
    calib = list(calib_x.split(calib_batch_size))

    def split(idx: np.ndarray) -> ItemMetric:
        pairs = zip(data.images[idx].split(512), data.labels[idx].split(512), strict=True)
        return ItemMetric(list(pairs), _top1)

    return Task(
        name=name, family=FAMILY, model=model, calib=calib, evaluate=split(data.test),
        metric_name="top1", validate=split(data.val), distance="kl",
    )


def _top1(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    images, labels = batch
    return (model(images).argmax(dim=1) == labels).double()


def digits_cnn(
    cache_dir: str | Path | None = None,
    *,
    seed: int = 0,
    calib_samples: int = 256,
    calib_batch_size: int = 64,
    epochs: int = 12,
) -> Task:
    """The narrow digits CNN (16-32-64 channels, 64 hidden units).

    Args:
        cache_dir: where trained weights are cached (None: train, do not cache).
        seed: seeds the splits, the initialisation and the training order.
        calib_samples: calibration images (a subset of the training split).
        calib_batch_size: images per calibration batch.
        epochs: training epochs.
    """
    hp = DigitsHParams(seed=seed, epochs=epochs)
    return _task("digits_cnn", hp, cache_dir, calib_samples, calib_batch_size)


def digits_cnn_wide(
    cache_dir: str | Path | None = None,
    *,
    seed: int = 0,
    calib_samples: int = 256,
    calib_batch_size: int = 64,
    epochs: int = 12,
) -> Task:
    """The wide sibling of :func:`digits_cnn` (32-64-128 channels, 128 hidden units)."""
    hp = DigitsHParams(widths=(32, 64, 128), hidden=128, seed=seed, epochs=epochs)
    return _task("digits_cnn_wide", hp, cache_dir, calib_samples, calib_batch_size)
