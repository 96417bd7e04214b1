import pytest
import torch
from _layers import mixed_layer

from automl_compress.errors import NonFiniteError, ShapeMismatchError
from automl_compress.solvers.hessian import inverse_hessian, prepare_hessian
from automl_compress.solvers.lstsq import masked_solve, replay_order, resolve_on_mask


def _layer(rows=12, cols=20, n=256, seed=0, mix=0.7):
    """tests/_layers.py's mixed layer, and its generator for the test's further draws."""
    g = torch.Generator().manual_seed(seed)
    return (*mixed_layer(rows, cols, n, mix=mix, generator=g), g)


def _per_row_lstsq(W, X, mask):
    """Reference: ordinary least squares of each row's outputs on its kept inputs only."""
    out = torch.zeros_like(W)
    for r in range(W.shape[0]):
        S = torch.nonzero(mask[r]).flatten()
        if S.numel():
            y = X @ W[r]
            out[r, S] = torch.linalg.lstsq(X[:, S], y[:, None]).solution.flatten()
    return out


def test_resolve_is_the_least_squares_optimum_on_the_mask():
    W, X, H, g = _layer()
    mask = torch.rand(W.shape, generator=g) > 0.5
    mask[0] = False  # a row with nothing kept
    mask[1] = True  # a dense row
    mask[5] = mask[4]  # rows sharing one mask (and one factorisation)
    res = resolve_on_mask(W, H, mask, damp=0.0)
    torch.testing.assert_close(res.weight, _per_row_lstsq(W, X, mask), rtol=0, atol=1e-9)
    assert torch.equal(res.mask, mask)
    assert torch.all(res.weight[~mask] == 0)
    assert torch.all(res.weight[0] == 0)
    torch.testing.assert_close(res.weight[1], W[1], rtol=0, atol=1e-10)
    # optimality: the gradient of the row loss vanishes on the support
    grad = (res.weight - W) @ H
    assert grad[mask].abs().max() < 1e-9 * H.abs().max()
    direct = (((W - res.weight) @ X.T) ** 2).sum(1) / X.shape[0]
    torch.testing.assert_close(res.row_error, direct, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("keep_fraction", [0.15, 0.85, 1.0])
def test_resolve_sparse_and_dense_masks(keep_fraction):
    # few kept → solve on the support; few pruned → one group-OBS removal via H⁻¹
    W, X, H, g = _layer(seed=6)
    mask = torch.rand(W.shape, generator=g) < keep_fraction
    res = resolve_on_mask(W, H, mask, damp=0.0, row_batch=5)
    torch.testing.assert_close(res.weight, _per_row_lstsq(W, X, mask), rtol=0, atol=1e-9)


def test_resolve_rows_of_every_kept_count_in_small_batches():
    # rows are sorted by the size of their factorisation and split by form: every kept count from
    # 0 to cols, in shuffled row order, must come back in its own row
    W, X, H, g = _layer(rows=21, cols=20, seed=7)
    order = torch.randperm(21, generator=g)
    mask = torch.zeros(W.shape, dtype=torch.bool)
    for r, k in zip(order.tolist(), range(21), strict=True):
        mask[r, torch.randperm(20, generator=g)[:k]] = True
    res = resolve_on_mask(W, H, mask, damp=0.0, row_batch=4)
    torch.testing.assert_close(res.weight, _per_row_lstsq(W, X, mask), rtol=0, atol=1e-9)


def test_resolve_beats_any_other_weights_on_the_same_support():
    W, _, H, g = _layer(seed=1)
    mask = torch.rand(W.shape, generator=g) > 0.6
    res = resolve_on_mask(W, H, mask, damp=0.0)
    for _ in range(5):
        other = res.weight + 0.01 * torch.randn(W.shape, generator=g, dtype=W.dtype) * mask
        d = W - other
        assert torch.all(0.5 * ((d @ H) * d).sum(1) >= res.row_error - 1e-12)
    kept_as_is = torch.where(mask, W, torch.zeros_like(W))
    d = W - kept_as_is
    assert res.error <= float(0.5 * ((d @ H) * d).sum())


def test_row_batches_and_damping():
    W, _, H, g = _layer(seed=2)
    mask = torch.rand(W.shape, generator=g) > 0.5
    a = resolve_on_mask(W, H, mask)
    b = resolve_on_mask(W, H, mask, row_batch=5)
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-12)
    # damping shrinks the solution towards the kept original weights: a small, bounded change
    c = resolve_on_mask(W, H, mask, damp=0.0)
    assert c.error <= a.error
    assert a.error <= c.error * 1.1
    f32 = resolve_on_mask(W.float(), H.float(), mask)
    assert f32.weight.dtype == torch.float32


def test_replay_order_snapshots_are_least_squares_optima():
    W, _, H, g = _layer(rows=6, cols=16, seed=3)
    prep = prepare_hessian(H, 0.01)
    Hinv = inverse_hessian(prep)
    order = torch.stack([torch.randperm(16, generator=g) for _ in range(6)])
    counts = torch.randint(0, 17, (4, 6), generator=g)
    counts[0] = 0
    counts[1] = 16
    snaps = replay_order(W, Hinv, order, counts, row_batch=4)
    pos = torch.argsort(order, dim=1)
    for lv in range(4):
        mask = pos >= counts[lv][:, None]
        ref = masked_solve(W, prep.H, mask)
        torch.testing.assert_close(snaps[lv], ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(snaps[0], W, rtol=0, atol=1e-12)
    assert torch.all(snaps[1] == 0)


def test_dead_inputs_and_bad_inputs():
    W, X, _, g = _layer(seed=4)
    X[:, 2] = 0.0
    H = 2 * X.T @ X / X.shape[0]
    mask = torch.ones(W.shape, dtype=torch.bool)
    res = resolve_on_mask(W, H, mask)
    assert torch.all(res.weight[:, 2] == 0)
    assert torch.isfinite(res.weight).all()
    direct = (((W - res.weight) @ X.T) ** 2).sum(1) / X.shape[0]
    torch.testing.assert_close(res.row_error, direct, rtol=1e-4, atol=1e-12)
    with pytest.raises(ShapeMismatchError):
        resolve_on_mask(W, H, mask[:, :5])
    with pytest.raises(ShapeMismatchError):
        resolve_on_mask(W, H, mask.float())
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        resolve_on_mask(bad, H, mask)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_agrees_with_cpu():
    W, _, H, g = _layer(rows=40, cols=48, seed=5)
    mask = torch.rand(W.shape, generator=g) > 0.5
    cpu = resolve_on_mask(W, H, mask)
    gpu = resolve_on_mask(W.cuda(), H.cuda(), mask.cuda(), dtype=torch.float64)
    assert gpu.weight.device.type == "cuda"
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, rtol=0, atol=1e-9)
    f32 = resolve_on_mask(W.float().cuda(), H.float().cuda(), mask.cuda())
    assert f32.error == pytest.approx(cpu.error, rel=1e-3)
