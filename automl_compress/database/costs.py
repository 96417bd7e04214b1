"""Size accounting (docs/allocation.md §1): what a deployment stores, per row and per layer.

Quantized values cost their bit-width; a removed row (0 bits) costs nothing; unstructured sparsity
adds a 1-bit-per-weight mask; N:M adds a ceil(log2 M)-bit index per kept value (2:4: 2 bits); every
kept row stores a scale and a zero point (16 bits each by default). Biases and layers that are not
compressed are counted at 32 bits in the model size, not in ``avg_bits``.
"""

from __future__ import annotations

import math

from automl_compress.config import CostConfig
from automl_compress.specs import Pattern


def kept_per_row(cols: int, pattern: str) -> int:
    """How many weights a row keeps under a layer pattern ('dense', 'N:M', 'P%')."""
    return Pattern.parse(pattern).kept(cols)


def pattern_fits(cols: int, pattern: str) -> bool:
    """Whether a layer with ``cols`` columns can take the pattern (N:M needs cols % M == 0)."""
    return Pattern.parse(pattern).fits(cols)


def row_bits(cols: int, bits: int, pattern: str, cost: CostConfig | None = None) -> float:
    """Bits to store one row of ``cols`` weights at ``bits`` under ``pattern``, with metadata."""
    cost = cost or CostConfig()
    if bits == 0:
        return 0.0
    pat = Pattern.parse(pattern)
    kept = pat.kept(cols)
    meta = float(cost.scale_bits + cost.zero_bits)
    if pat.kind == "unstructured":
        meta += cols  # 1-bit mask per weight
    elif pat.n_m is not None:
        meta += kept * math.ceil(math.log2(pat.n_m[1]))
    return kept * bits + meta
