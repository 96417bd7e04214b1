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


def test_refill_puts_new_coordinates_in_fixed_slots_and_keeps_the_rest():
    """After two eliminations, two fixed slots take two new coordinates: the stored inverse is
    the old one on the other slots and the given border on the refilled ones; it refuses while
    downdates are pending."""
    w, Hinv = _problem(rows=2, n=5)
    inv = LazyInverse(w, Hinv.expand(2, 5, 5).clone(), 4, False)
    _run(inv, 2)
    with pytest.raises(ValueError, match="no pending downdates"):
        inv.refill(torch.zeros((2, 1), dtype=torch.long), w[:, :1], torch.zeros(2, 5, 1),
                   torch.ones(2, 1, 1))
    inv.flush()
    fixed = inv.diag < 0
    slots = torch.nonzero(fixed)[:, 1].view(2, 2)
    before, w_before = inv.base.clone(), inv.w.clone()
    side = torch.randn(2, 5, 2, dtype=torch.float64).masked_fill(fixed[:, :, None], 0.0)
    side.scatter_(1, slots[:, :, None].expand(2, 2, 2), 0.0)  # overwritten by the corner
    corner = torch.tensor([[2.0, 0.5], [0.5, 3.0]], dtype=torch.float64).expand(2, 2, 2)
    new_w = torch.tensor([[7.0, 8.0], [9.0, 10.0]], dtype=torch.float64)
    inv.refill(slots, new_w, side, corner)
    for r in range(2):
        s = slots[r]
        rest = torch.tensor([j for j in range(5) if j not in s.tolist()])
        torch.testing.assert_close(inv.base[r][rest][:, rest], before[r][rest][:, rest])
        torch.testing.assert_close(inv.base[r][:, s][rest], side[r][rest])
        torch.testing.assert_close(inv.base[r][s][:, rest], side[r][rest].T)
        torch.testing.assert_close(inv.base[r][s][:, s], corner[r])
        torch.testing.assert_close(inv.w[r][s], new_w[r])
        torch.testing.assert_close(inv.w[r][rest], w_before[r][rest])
        torch.testing.assert_close(inv.diag[r][s], torch.tensor([2.0, 3.0], dtype=torch.float64))
