"""Architecture-agnostic, normalised observation features (docs/env.md §2).

One fixed-size vector serves every controller and every model: nothing in it depends on the number
of layers or channels, only on the option menu (how many bit-widths and patterns), which the saved
policy's manifest records. Every entry is scaled by a fixed constant (no per-model statistics), so
a policy trained on one model reads another model's features on the same scale.

Layout of the budget form (:func:`budget_layout`; float32, clipped to [-OBS_CLIP, OBS_CLIP]):

========================  =====================================================================
layer (10)                relative depth index/(L-1); kind one-hot (linear, conv1d, conv2d);
                          log2(rows)/12; log2(cols)/16; log2(kernel area)/6; max stride/4;
                          the layer's share of compressible weights and of MACs
error curve (nz+np-1)  per non-zero bit-width b: log10(E(dense, b)/E(0)) / 6, and per
                          non-dense pattern p: log10(E(p, max bits)/E(0)) / 6, where E is the
                          layer's summed exact table error and E(0) its 0-bit (removed) error
budget (3)                budget used / total budget; remaining avg bits per remaining weight / 8;
                          share of weights still to decide
previous layer action (3) level fraction, pattern index / (np-1), prune fraction
channel (5 + nz)        group position j/G; share of the layer's rows in this group; layer
                          budget left in avg bits per undecided weight / 8; previous group's
                          bit index / (nb-1); active pattern index / (np-1); the group's mean
                          normalised error curve log10(E_g(b)/E_g(0)) / 6 per non-zero b
phase (1)                 0 for a layer decision, 1 for a group decision
========================  =====================================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from automl_compress.database.tables import LayerTable

FEATURE_VERSION = 3  # 2: group actions relative to the fair share; 3: the coefficient anchor
OBS_CLIP = 8.0
KINDS = ("linear", "conv1d", "conv2d")
_TINY = 1e-30


@dataclass(frozen=True)
class ObsLayout:
    """The named blocks of an observation vector, in order: the one place its layout is defined.

    Both the observation builders (:meth:`build`) and the observation spaces (:attr:`size`) read
    it, so they cannot disagree; :meth:`build` refuses a block of the wrong length.

    Attributes:
        blocks: (name, length) per block, in vector order.
    """

    blocks: tuple[tuple[str, int], ...]

    @property
    def size(self) -> int:
        """Length of the observation vector: the sum of the block lengths."""
        return sum(n for _, n in self.blocks)

    def build(self, **parts: Sequence[float] | np.ndarray) -> np.ndarray:
        """The float32 vector of the named blocks in layout order, clipped to ±OBS_CLIP.

        Raises:
            ValueError: a block missing, unknown or of the wrong length.
        """
        names = [name for name, _ in self.blocks]
        if sorted(parts) != sorted(names):
            raise ValueError(f"observation blocks {sorted(parts)} do not match the layout {names}")
        vecs = []
        for name, n in self.blocks:
            v = np.asarray(parts[name], dtype=np.float64).reshape(-1)
            if len(v) != n:
                raise ValueError(f"observation block {name!r} has {len(v)} entries, the layout "
                                 f"says {n}")
            vecs.append(v)
        return np.clip(np.concatenate(vecs), -OBS_CLIP, OBS_CLIP).astype(np.float32)


def _static_size(menu_bits: Sequence[int], n_patterns: int) -> int:
    return 10 + sum(1 for b in menu_bits if b > 0) + (n_patterns - 1)


def budget_layout(menu_bits: Sequence[int], n_patterns: int) -> ObsLayout:
    """The budget form's observation (CompressionEnv, and the HAQ env): the table above."""
    nz = sum(1 for b in menu_bits if b > 0)
    return ObsLayout((("layer", _static_size(menu_bits, n_patterns)), ("budget", 3),
                      ("previous", 3), ("channel", 5 + nz), ("phase", 1)))


def coef_layout(menu_bits: Sequence[int], n_patterns: int) -> ObsLayout:
    """The coefficient form's observation.

    The layer block (layer + error curve); the budget (B / 8, (B − B_min) / 8); the phase; the group
    (position, share of rows, error curve); the decided coefficients (the layer's, the previous
    group's); the anchor's coefficient at this decision (0 with the DP anchor).
    """
    nz = sum(1 for b in menu_bits if b > 0)
    return ObsLayout((("layer", _static_size(menu_bits, n_patterns)), ("budget", 2),
                      ("phase", 1), ("group", 2 + nz), ("decided", 2),
                      ("anchor", 1)))


def obs_size(menu_bits: Sequence[int], n_patterns: int) -> int:
    """Length of the budget form's observation for a menu of bit-widths and patterns."""
    return budget_layout(menu_bits, n_patterns).size


def log_ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """log10(num/den)/6 with both floored at a tiny positive value (ratios ≤ 1 map to [-1, 0])."""
    n = np.maximum(np.asarray(num, dtype=np.float64), _TINY)
    d = np.maximum(np.asarray(den, dtype=np.float64), _TINY)
    return np.log10(n / d) / 6.0


def layer_static(
    tables: Sequence[LayerTable], menu_bits: Sequence[int], menu_patterns: Sequence[str]
) -> np.ndarray:
    """The per-layer static features (layer block + error-curve block), one row per layer.

    Args:
        tables: the model's layer tables in forward order.
        menu_bits: the menu's bit-widths (ascending, 0 first when present).
        menu_patterns: the menu's patterns ('dense' first).

    Returns:
        (L, 10 + nz + (np-1)) float64 array.
    """
    n_layers = len(tables)
    numel = np.array([t.info.numel for t in tables], dtype=np.float64)
    macs = np.array([max(t.info.macs, 0) for t in tables], dtype=np.float64)
    nz_bits = [b for b in menu_bits if b > 0]
    rows = []
    for t in tables:
        i = t.info
        kind = [1.0 if i.kind == k else 0.0 for k in KINDS]
        area = float(np.prod(i.kernel)) if i.kernel else 1.0
        stride = float(max(i.stride)) if i.stride else 1.0
        depth = i.index / (n_layers - 1) if n_layers > 1 else 0.0
        feats = [
            depth, *kind, math.log2(max(i.rows, 1)) / 12.0, math.log2(max(i.cols, 1)) / 16.0,
            math.log2(max(area, 1.0)) / 6.0, stride / 4.0,
            i.numel / numel.sum(), (i.macs / macs.sum()) if macs.sum() > 0 else 0.0,
        ]
        e_by_bit = t.errors.sum(axis=0)  # (patterns, bits)
        e0 = float(e_by_bit[0, 0]) if t.bits[0] == 0 else float(e_by_bit[0].max())
        curve = []
        for b in nz_bits:
            curve.append(float(log_ratio(e_by_bit[0, t.bits.index(b)], e0)) if b in t.bits
                         else 0.0)
        for p in menu_patterns[1:]:
            if p in t.patterns:
                curve.append(float(log_ratio(e_by_bit[t.patterns.index(p), -1], e0)))
            else:
                curve.append(1.0)  # marks an unavailable pattern
        rows.append(feats + curve)
    return np.asarray(rows, dtype=np.float64)


def group_curve(errors: np.ndarray, bits: Sequence[int]) -> np.ndarray:
    """A group's mean normalised error curve: log10(E_g(b)/E_g(0))/6 per non-zero bit-width.

    Args:
        errors: (rows_in_group, n_bits) table errors of the group's rows under the layer pattern.
        bits: the table's bit-widths.
    """
    e = errors.sum(axis=0)
    e0 = float(e[0]) if bits[0] == 0 else float(e.max())
    return log_ratio(e[[k for k, b in enumerate(bits) if b > 0]], e0)
