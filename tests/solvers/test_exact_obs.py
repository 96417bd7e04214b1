import numpy as np
import pytest
import torch
from _layers import mixed_layer

from automl_compress.errors import (
    InvalidInputError,
    NMPatternError,
    NonFiniteError,
    ShapeMismatchError,
    SparsityOutOfRangeError,
)
from automl_compress.solvers import exact_obs_prune, magnitude_prune
from automl_compress.solvers.exact_obs import allocate_counts, channel_major_perm
from automl_compress.solvers.lstsq import resolve_on_mask


def _layer(rows=16, cols=32, n=384, seed=0, mix=0.7):
    return mixed_layer(rows, cols, n, seed, mix)


def _output_mse(W, W_hat, X):
    return (((W - W_hat) @ X.T) ** 2).sum(1) / X.shape[0]


def _exact_dp(C, K):
    """min Σ_r C[r, k_r] s.t. Σ k_r = K, by dynamic programming over rows."""
    rows, n1 = C.shape
    prev = np.full(K + 1, np.inf)
    prev[0] = 0.0
    for r in range(rows):
        new = np.full(K + 1, np.inf)
        for j in range(min(n1, K + 1)):
            new[j:] = np.minimum(new[j:], prev[: K + 1 - j] + C[r, j])
        prev = new
    return prev[K]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sparsity": 0.6},
        {"sparsity": 0.5, "allocation": "uniform"},
        {"n_m": (2, 4)},
        {"sparsity": 0.5, "block": 4},
        {"n_m": (1, 4), "kernel_area": 4},
    ],
)
def test_row_error_is_output_mse(kwargs):
    W, X, H = _layer()
    res = exact_obs_prune(W, H, **kwargs)
    assert res.weight.dtype == W.dtype and res.weight.shape == W.shape
    assert res.row_error.dtype == torch.float64
    torch.testing.assert_close(res.row_error, _output_mse(W, res.weight, X), rtol=1e-4, atol=0)
    assert torch.all(res.weight[~res.mask] == 0)


def test_one_step_is_the_best_single_removal():
    W, _, H = _layer(rows=6, cols=12, seed=1)
    rows, cols = W.shape
    res = exact_obs_prune(W, H, sparsity=1 / cols, allocation="uniform", damp=0.0)
    assert torch.equal((~res.mask).sum(1), torch.ones(rows, dtype=torch.int64))
    for r in range(rows):
        errs = []
        for j in range(cols):
            S = [i for i in range(cols) if i != j]
            v = torch.zeros(cols, dtype=torch.float64)
            v[S] = torch.linalg.solve(H[S][:, S], (H @ W[r])[S])
            d = W[r] - v
            errs.append(float(0.5 * d @ H @ d))
        best = int(np.argmin(errs))
        assert not res.mask[r, best]
        assert int(res.info["order"][r, 0]) == best
        assert res.row_error[r].item() == pytest.approx(errs[best], rel=1e-9)
        assert float(res.info["step_losses"][r, 0]) == pytest.approx(errs[best], rel=1e-9)


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_every_level_is_the_least_squares_optimum_and_equals_separate_runs(allocation):
    W, X, H = _layer(seed=2)
    levels = [0.25, 0.5, 0.75, 0.9]
    results = exact_obs_prune(W, H, sparsity=levels, allocation=allocation, damp=0.0)
    assert len(results) == len(levels)
    prev = -1.0
    for s, res in zip(levels, results, strict=True):
        ls = resolve_on_mask(W, H, res.mask, damp=0.0)
        torch.testing.assert_close(res.weight, ls.weight, rtol=0, atol=1e-9)
        alone = exact_obs_prune(W, H, sparsity=s, allocation=allocation, damp=0.0)
        assert torch.equal(alone.mask, res.mask)
        torch.testing.assert_close(alone.weight, res.weight, rtol=0, atol=1e-12)
        # undamped: the cumulative step losses of the pass are the exact layer error
        steps = res.info["step_losses"]
        zeros = (~res.mask).sum(1)
        cum = torch.stack([steps[r, : zeros[r]].sum() for r in range(W.shape[0])])
        assert res.error > prev
        prev = res.error
        assert cum.sum().item() == pytest.approx(res.error, rel=1e-8)


def test_structured_weights_are_the_least_squares_optimum():
    W, _, H = _layer(seed=3)
    for kwargs in ({"n_m": (2, 4)}, {"sparsity": 0.5, "block": 4, "kernel_area": 2}):
        res = exact_obs_prune(W, H, **kwargs)
        ls = resolve_on_mask(W, H, res.mask)
        torch.testing.assert_close(res.weight, ls.weight, rtol=0, atol=1e-9)


def test_sparsity_is_exactly_as_asked():
    W, _, H = _layer(rows=10, cols=30, seed=4)
    rows, cols = W.shape
    for s in (0.1, 0.37, 0.5, 0.83):
        glob = exact_obs_prune(W, H, sparsity=s)
        assert int((~glob.mask).sum()) == round(s * rows * cols)
        uni = exact_obs_prune(W, H, sparsity=s, allocation="uniform")
        assert torch.all((~uni.mask).sum(1) == round(s * cols))
    blk = exact_obs_prune(W, H, sparsity=0.5, block=5, allocation="uniform")
    assert torch.all((~blk.mask).sum(1) == 15)


def test_global_allocation_beats_uniform_and_global_sort():
    W, _, H = _layer(rows=24, cols=32, seed=5)
    rows, cols = W.shape
    for s in (0.25, 0.5, 0.75, 0.875):
        glob = exact_obs_prune(W, H, sparsity=s)
        uni = exact_obs_prune(W, H, sparsity=s, allocation="uniform")
        assert int((~glob.mask).sum()) == int((~uni.mask).sum())
        assert glob.error <= uni.error * (1 + 1e-9)
        # the released OBC code: K smallest step losses of the layer, counted per row
        steps = glob.info["step_losses"]
        K = round(s * rows * cols)
        taken = torch.argsort(steps.flatten(), stable=True)[:K]
        counts = torch.bincount(taken // cols, minlength=rows)
        pos = torch.argsort(glob.info["order"], dim=1)
        mask_sort = pos >= counts[:, None]
        sort_err = resolve_on_mask(W, H, mask_sort).error
        assert glob.error <= sort_err * (1 + 1e-9)


def test_allocation_is_near_the_exact_dp_optimum():
    rng = np.random.default_rng(0)
    rows, n = 12, 20
    for _ in range(4):
        # non-monotone step losses, like real per-row greedy curves
        ul = np.exp(rng.normal(size=(rows, n))) * np.linspace(0.05, 1.0, n)[None, :] ** 2
        C = np.concatenate([np.zeros((rows, 1)), np.cumsum(ul, axis=1)], axis=1)
        totals = list(range(0, rows * n + 1, 17))
        counts = allocate_counts(ul, totals)
        for K, k in zip(totals, counts, strict=True):
            assert int(k.sum()) == K and k.min() >= 0 and k.max() <= n
            ours = C[np.arange(rows), k].sum()
            best = _exact_dp(C, K)
            assert best - 1e-9 <= ours <= best * 1.01 + 1e-12


@pytest.mark.parametrize("active_set", [False, True])
@pytest.mark.parametrize("lazy_rank", [1, 5, 64, None])
def test_lazy_downdates_active_set_and_row_batches_keep_the_greedy_order(lazy_rank, active_set):
    W, _, H = _layer(rows=12, cols=40, seed=6)
    ref = exact_obs_prune(W, H, sparsity=0.5, lazy_rank=1, row_batch=12, active_set=False)
    res = exact_obs_prune(
        W, H, sparsity=0.5, lazy_rank=lazy_rank, row_batch=5, active_set=active_set
    )
    assert torch.equal(res.info["order"], ref.info["order"])
    torch.testing.assert_close(res.info["step_losses"], ref.info["step_losses"], rtol=1e-8, atol=0)
    nm_ref = exact_obs_prune(W, H, n_m=(2, 4), lazy_rank=1, active_set=False)
    nm = exact_obs_prune(W, H, n_m=(2, 4), lazy_rank=lazy_rank, row_batch=7, active_set=active_set)
    assert torch.equal(nm.mask, nm_ref.mask)
    torch.testing.assert_close(nm.weight, nm_ref.weight, rtol=0, atol=1e-9)
    torch.testing.assert_close(nm.weight, resolve_on_mask(W, H, nm.mask).weight, rtol=0, atol=1e-9)
    blk_ref = exact_obs_prune(W, H, sparsity=[0.5], block=4, lazy_rank=1)[0]
    blk = exact_obs_prune(W, H, sparsity=[0.5], block=4, lazy_rank=lazy_rank, row_batch=5)[0]
    assert torch.equal(blk.info["block_order"], blk_ref.info["block_order"])


def test_float32_working_precision_agrees_with_float64():
    W, _, H = _layer(rows=8, cols=64, seed=12)
    a = exact_obs_prune(W, H, [0.5, 0.9])
    b = exact_obs_prune(W.float(), H.float(), [0.5, 0.9], dtype=torch.float32, active_set=True)
    for x, y in zip(a, b, strict=True):
        assert y.weight.dtype == torch.float32
        assert torch.equal(x.mask, y.mask)
        assert y.error == pytest.approx(x.error, rel=1e-4)


def test_exact_obs_beats_magnitude():
    W, _, H = _layer(seed=7)
    assert exact_obs_prune(W, H, 0.5).error < magnitude_prune(W, 0.5, H=H).error
    assert exact_obs_prune(W, H, n_m=(2, 4)).error < magnitude_prune(W, n_m=(2, 4), H=H).error
    # blocks against magnitude on whole blocks (smallest block norms of the layer)
    blk = exact_obs_prune(W, H, 0.5, block=4)
    norms = W.reshape(W.shape[0], -1, 4).norm(dim=2)
    drop = norms.flatten().topk(norms.numel() // 2, largest=False).indices
    keep = torch.ones(norms.numel(), dtype=torch.bool)
    keep[drop] = False
    keep = keep.reshape(norms.shape).repeat_interleave(4, dim=1)
    W_mag = torch.where(keep, W, torch.zeros_like(W))
    mag_err = float(0.5 * (((W - W_mag) @ H) * (W - W_mag)).sum())
    assert int((~blk.mask).sum()) == int((~keep).sum())
    assert blk.error < mag_err


@pytest.mark.parametrize("kernel_area", [1, 3])
def test_nm_pattern_holds_along_input_channels(kernel_area):
    c_in = 8
    W, _, H = _layer(rows=6, cols=c_in * kernel_area, seed=8)
    res = exact_obs_prune(W, H, n_m=(2, 4), kernel_area=kernel_area)
    # (rows, C_in, taps) -> groups of 4 consecutive input channels at every tap keep exactly 2
    keep = res.mask.reshape(6, c_in, kernel_area).permute(0, 2, 1).reshape(6, kernel_area, -1, 4)
    assert torch.all(keep.sum(-1) == 2)
    perm = channel_major_perm(c_in * kernel_area, kernel_area)
    assert torch.equal(torch.sort(perm).values, torch.arange(c_in * kernel_area))


def test_blocks_are_whole_runs_of_input_channels():
    c_in, taps, c = 8, 2, 4
    W, _, H = _layer(rows=5, cols=c_in * taps, seed=9)
    res = exact_obs_prune(W, H, sparsity=0.5, block=c, kernel_area=taps)
    blocks = res.mask.reshape(5, c_in, taps).permute(0, 2, 1).reshape(5, taps, c_in // c, c)
    assert torch.all(blocks.all(-1) | (~blocks).all(-1))
    assert int((~res.mask).sum()) == W.numel() // 2


def test_dead_inputs_are_pruned_first_at_no_cost():
    W, X, _ = _layer(seed=10)
    X[:, [3, 17]] = 0.0
    H = 2 * X.T @ X / X.shape[0]
    res = exact_obs_prune(W, H, sparsity=0.5)
    assert not res.mask[:, [3, 17]].any()
    assert torch.all(res.info["step_losses"][:, :2] == 0)
    torch.testing.assert_close(res.row_error, _output_mse(W, res.weight, X), rtol=1e-4, atol=0)


def test_bad_inputs_raise_named_errors():
    W, _, H = _layer(rows=4, cols=8)
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        exact_obs_prune(bad, H)
    with pytest.raises(ShapeMismatchError):
        exact_obs_prune(W, H[:6, :6])
    with pytest.raises(SparsityOutOfRangeError):
        exact_obs_prune(W, H, sparsity=1.0)
    with pytest.raises(SparsityOutOfRangeError):
        exact_obs_prune(W, H, sparsity=[0.5, -0.1])
    with pytest.raises(NMPatternError):
        exact_obs_prune(W[:, :6], H[:6, :6], n_m=(2, 4))
    with pytest.raises(NMPatternError):
        exact_obs_prune(W, H, n_m=(2, 4), kernel_area=4)  # C_in = 2
    with pytest.raises(ShapeMismatchError):
        exact_obs_prune(W, H, sparsity=0.5, block=3)
    with pytest.raises(ShapeMismatchError):
        exact_obs_prune(W, H, kernel_area=3)
    with pytest.raises(InvalidInputError):
        exact_obs_prune(W, H, allocation="best")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_agrees_with_cpu():
    W, _, H = _layer(rows=32, cols=64, seed=11)
    for kwargs in ({"sparsity": [0.5, 0.8]}, {"n_m": (2, 4)}, {"sparsity": [0.5], "block": 4}):
        cpu = exact_obs_prune(W, H, **kwargs)
        gpu = exact_obs_prune(W.cuda(), H.cuda(), dtype=torch.float64, **kwargs)
        cpu = cpu if isinstance(cpu, list) else [cpu]
        gpu = gpu if isinstance(gpu, list) else [gpu]
        for a, b in zip(cpu, gpu, strict=True):
            assert b.weight.device.type == "cuda"
            torch.testing.assert_close(b.weight.cpu(), a.weight, rtol=0, atol=1e-8)
            assert torch.equal(b.mask.cpu(), a.mask)
    f32 = exact_obs_prune(W.float().cuda(), H.float().cuda(), sparsity=0.5)
    ref = exact_obs_prune(W.float(), H.float(), sparsity=0.5)
    assert f32.weight.dtype == torch.float32
    assert f32.error == pytest.approx(ref.error, rel=2e-2)
