"""The shared lazy OBS elimination: declared steps skip the last flush and bound the steps."""

from __future__ import annotations

import pytest
import torch

from automl_compress.solvers.lazy_inverse import LazyInverse


def _problem(rows: int = 3, n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * n, n, generator=g, dtype=torch.float64)
    return torch.randn(rows, n, generator=g, dtype=torch.float64), torch.linalg.inv(X.T @ X)


def _run(inv: LazyInverse, steps: int) -> torch.Tensor:
    for _ in range(steps):
        p = torch.argmax(torch.div(inv.diag, inv.w * inv.w), dim=1)  # any free slot will do
        inv.eliminate(p, torch.zeros((inv.w.shape[0], 1), dtype=inv.w.dtype))
    return inv.result()


def test_declared_steps_leave_the_last_downdates_pending_with_the_eager_result():
    w, Hinv = _problem()
    eager = _run(LazyInverse(w, Hinv, 1, False), 4)
    inv = LazyInverse(w, Hinv, 2, False, steps=4)
    torch.testing.assert_close(_run(inv, 4), eager, rtol=0, atol=1e-12)
    assert inv.k == 2  # the last two downdates were never applied: no step reads them
    with pytest.raises(ValueError, match="steps declared"):
        _run(inv, 1)
    undeclared = LazyInverse(w, Hinv, 2, False)
    _run(undeclared, 4)
    assert undeclared.k == 0  # without steps every full queue is flushed
