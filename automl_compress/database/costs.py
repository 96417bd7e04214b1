"""Size accounting (docs/allocation.md §1): what a deployment stores, per row and per layer.

Quantized values cost their bit-width; a removed row (0 bits) costs nothing; unstructured sparsity
adds a 1-bit-per-weight mask; N:M adds a ceil(log2 M)-bit index per kept value (2:4: 2 bits); every
kept row stores a scale and a zero point (16 bits each by default). Biases and layers that are not
compressed are counted at 32 bits in the model size, not in ``avg_bits``.
"""

from __future__ import annotations

import math

from automl_compress.config import CostConfig, parse_pattern


def kept_per_row(cols: int, pattern: str) -> int:
    """How many weights a row keeps under a layer pattern ('dense', 'N:M', 'P%')."""
    kind, arg = parse_pattern(pattern)
    if kind == "dense":
        return cols
    if kind == "nm":
        n, m = arg  # type: ignore[misc]
        return cols // m * n
    return cols - int(round(float(arg) * cols))  # type: ignore[arg-type]


def pattern_fits(cols: int, pattern: str) -> bool:
    """Whether a layer with ``cols`` columns can take the pattern (N:M needs cols % M == 0)."""
    kind, arg = parse_pattern(pattern)
    return kind != "nm" or cols % arg[1] == 0  # type: ignore[index]


def row_bits(cols: int, bits: int, pattern: str, cost: CostConfig | None = None) -> float:
    """Bits to store one row of ``cols`` weights at ``bits`` under ``pattern``, with metadata."""
    cost = cost or CostConfig()
    if bits == 0:
        return 0.0
    kind, arg = parse_pattern(pattern)
    kept = kept_per_row(cols, pattern)
    meta = float(cost.scale_bits + cost.zero_bits)
    if kind == "unstructured":
        meta += cols  # 1-bit mask per weight
    elif kind == "nm":
        meta += kept * math.ceil(math.log2(arg[1]))  # type: ignore[index]
    return kept * bits + meta

