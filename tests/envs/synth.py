"""Layer tables synthesised from random correlated layers (no database build needed).

Each layer gets a weight W and a Hessian H = 2XXᵀ/n from correlated inputs X; the table entries are
the exact row errors 0.5 (w−ŵ) H (w−ŵ)ᵀ of round-to-nearest quantization (dense) and of
magnitude 2:4 pruning followed by round-to-nearest of the kept weights (2:4), at every bit-width.
"""

from __future__ import annotations

import dataclasses

import torch

from automl_compress.config import Config, MenuConfig, load_config
from automl_compress.database.tables import LayerTable
from automl_compress.solvers.baselines import magnitude_prune, rtn_quantize
from automl_compress.solvers.hessian import row_errors
from automl_compress.specs import LayerInfo

BITS = (0, 2, 3, 4, 6, 8)
SHAPES = (  # name, kind, rows, cols, kernel
    ("conv1", "conv2d", 8, 9, (3, 3)),
    ("conv2", "conv2d", 16, 72, (3, 3)),
    ("fc1", "linear", 24, 64, ()),
    ("fc2", "linear", 10, 24, ()),
)


def synth_tables(seed: int = 0, shapes=SHAPES, bits=BITS) -> list[LayerTable]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, (name, kind, rows, cols, kernel) in enumerate(shapes):
        mix = torch.randn(cols, cols, generator=gen, dtype=torch.float64) / cols**0.5
        X = torch.randn(4 * cols, cols, generator=gen, dtype=torch.float64) @ (
            torch.eye(cols, dtype=torch.float64) + mix)
        H = 2.0 * X.T @ X / X.shape[0]
        W = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * torch.rand(
            rows, 1, generator=gen, dtype=torch.float64)
        patterns = ("dense", "2:4") if cols % 4 == 0 else ("dense",)  # 2:4 needs cols % 4 == 0
        errs = torch.zeros(rows, len(patterns), len(bits), dtype=torch.float64)
        for k, b in enumerate(bits):
            errs[:, 0, k] = rtn_quantize(W, b, H=H).row_error
            if len(patterns) == 2:
                mask = magnitude_prune(W, n_m=(2, 4)).mask
                Wq = rtn_quantize(W * mask, b).weight * mask if b else torch.zeros_like(W)
                errs[:, 1, k] = row_errors(W, Wq, H)
        info = LayerInfo(name, kind, rows, cols, kernel, (1, 1) if kernel else (), 1,
                         rows * cols * (64 if kernel else 1), i, True)
        out.append(LayerTable(info, bits, patterns, errs.numpy()))
    return out


def synth_config(budget: float = 3.0, bits=BITS, **env) -> Config:
    """A config whose menu matches the synthesised tables, with env overrides."""
    cfg = load_config(None, ["menu.patterns=[dense, '2:4']"])
    return dataclasses.replace(
        cfg, menu=MenuConfig(bits=tuple(bits), patterns=("dense", "2:4")),
        env=dataclasses.replace(cfg.env, budget_bits=float(budget), **env),
    )
