"""Synthetic layer tables shaped like real ones, for the allocator tests."""

from __future__ import annotations

import numpy as np

from automl_compress.database.tables import LayerTable
from automl_compress.specs import LayerInfo


def random_table(rows, cols, bits=(0, 2, 3, 4, 8), patterns=("dense", "50%"), seed=0, name="l"):
    """Errors shaped like real ones: decreasing in bits, sparse patterns worse, 0 bits = energy."""
    rng = np.random.default_rng(seed)
    energy = rng.gamma(2.0, 1.0, size=rows) * cols
    sens = rng.lognormal(0.0, 1.0, size=rows)
    errs = np.zeros((rows, len(patterns), len(bits)))
    for pi in range(len(patterns)):
        for bi, b in enumerate(bits):
            if b == 0:
                errs[:, pi, bi] = energy
            else:
                errs[:, pi, bi] = np.minimum(energy, sens * 4.0 ** (-b) * cols * (1 + 2 * pi))
    info = LayerInfo(name=name, kind="linear", rows=rows, cols=cols)
    return LayerTable(info, tuple(bits), tuple(patterns), errs)
