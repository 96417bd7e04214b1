import pytest
import torch
from _layers import mixed_layer

from automl_compress.errors import (
    BitsOutOfRangeError,
    NMPatternError,
    NonFiniteError,
    ShapeMismatchError,
    SparsityOutOfRangeError,
)
from automl_compress.solvers import (
    exact_obs_prune,
    fit_grid,
    magnitude_prune,
    rtn_quantize,
    sparsegpt_prune,
)
from automl_compress.solvers.hessian import row_errors
from automl_compress.solvers.lstsq import resolve_on_mask


def _layer(rows=24, cols=64, n=512, seed=0, mix=0.7):
    return mixed_layer(rows, cols, n, seed, mix)


def _output_mse(W, W_hat, X):
    return (((W - W_hat) @ X.T) ** 2).sum(1) / X.shape[0]


def _fixed_order_reference(W, H, keep, grid=None):
    """Column by column: fix w_j (0 if pruned, else its grid value) and compensate with the
    columns to its right through the exact inverse of H[j:, j:] (the SparseGPT update)."""
    W = W.clone()
    for j in range(W.shape[1]):
        Hinv = torch.linalg.inv(H[j:, j:])
        t = W[:, j] if grid is None else grid.quantize(W[:, j : j + 1]).squeeze(1)
        t = torch.where(keep[:, j], t, torch.zeros_like(t))
        W[:, j:] -= ((W[:, j] - t) / Hinv[0, 0])[:, None] * Hinv[0][None, :]
        W[:, j] = t
    return W


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sparsity": 0.5},
        {"sparsity": 0.7, "block_size": 16},
        {"n_m": (2, 4)},
        {"sparsity": 0.5, "bits": 4},
        {"n_m": (2, 4), "bits": 3, "kernel_area": 4},
    ],
)
def test_row_error_is_output_mse_and_sparsity_is_exact(kwargs):
    W, X, H = _layer()
    res = sparsegpt_prune(W, H, **kwargs)
    assert res.weight.dtype == W.dtype and res.mask.dtype == torch.bool
    torch.testing.assert_close(res.row_error, _output_mse(W, res.weight, X), rtol=1e-4, atol=0)
    assert torch.all(res.weight[~res.mask] == 0)
    if "sparsity" in kwargs:
        assert int((~res.mask).sum()) == round(kwargs["sparsity"] * W.numel())


def test_updates_match_the_fixed_order_obs_reference():
    W, _, H = _layer(rows=8, cols=24, seed=1)
    # block_size >= cols: the whole mask is chosen first, then the columns are eliminated
    res = sparsegpt_prune(W, H, 0.5, damp=0.0, block_size=64)
    ref = _fixed_order_reference(W, H, res.mask)
    torch.testing.assert_close(res.weight, ref, rtol=0, atol=1e-9)
    q = sparsegpt_prune(W, H, 0.5, bits=4, damp=0.0, block_size=64)
    grid = fit_grid(W, 4)
    torch.testing.assert_close(
        q.weight, _fixed_order_reference(W, H, q.mask, grid), atol=1e-9, rtol=0
    )


def test_sparsegpt_beats_magnitude_and_exact_resolve_beats_sparsegpt():
    W, _, H = _layer(seed=2)
    for s in (0.5, 0.7):
        sg = sparsegpt_prune(W, H, s)
        assert sg.error < magnitude_prune(W, s, H=H).error
        ls = resolve_on_mask(W, H, sg.mask)
        assert torch.equal(ls.mask, sg.mask)
        assert ls.error <= sg.error
        assert torch.all(ls.row_error <= sg.row_error * (1 + 1e-9) + 1e-12)
        assert exact_obs_prune(W, H, s).error < sg.error
    nm = sparsegpt_prune(W, H, n_m=(2, 4))
    assert nm.error < magnitude_prune(W, n_m=(2, 4), H=H).error
    assert resolve_on_mask(W, H, nm.mask).error <= nm.error


@pytest.mark.parametrize("kernel_area", [1, 2])
def test_nm_pattern_holds(kernel_area):
    W, _, H = _layer(rows=6, cols=32)
    res = sparsegpt_prune(W, H, n_m=(1, 4), kernel_area=kernel_area, block_size=6)
    c_in = 32 // kernel_area
    keep = res.mask.reshape(6, c_in, kernel_area).permute(0, 2, 1).reshape(6, kernel_area, -1, 4)
    assert torch.all(keep.sum(-1) == 1)


def test_joint_quantization_puts_kept_weights_on_the_grid():
    W, _, H = _layer(seed=3)
    res = sparsegpt_prune(W, H, 0.5, bits=4)
    assert res.bits == 4 and res.scale is not None
    codes = res.weight / res.scale[:, None] + res.zero[:, None]
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-9)
    assert torch.all((codes.round() >= 0) & (codes.round() <= 15))
    # pruning half the weights costs more than 4-bit rounding alone, but the OBS compensation
    # keeps the joint result below pruning-then-rounding without compensation
    assert res.error > sparsegpt_prune(W, H, 0.5).error
    naive_q = rtn_quantize(magnitude_prune(W, 0.5).weight, 4).weight
    assert res.error < float(row_errors(W, naive_q, H).sum())


def test_bad_inputs_raise_named_errors():
    W, _, H = _layer(rows=4, cols=8)
    bad = H.clone()
    bad[1, 1] = float("inf")
    with pytest.raises(NonFiniteError):
        sparsegpt_prune(W, bad)
    with pytest.raises(ShapeMismatchError):
        sparsegpt_prune(W[0], H)
    with pytest.raises(SparsityOutOfRangeError):
        sparsegpt_prune(W, H, sparsity=1.5)
    with pytest.raises(NMPatternError):
        sparsegpt_prune(W[:, :6], H[:6, :6], n_m=(2, 4))
    with pytest.raises(NMPatternError):
        sparsegpt_prune(W, H, n_m=(4, 4))
    with pytest.raises(BitsOutOfRangeError):
        sparsegpt_prune(W, H, bits=1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_agrees_with_cpu():
    W, _, H = _layer(rows=32, cols=128, seed=4)
    for kwargs in ({"sparsity": 0.5}, {"n_m": (2, 4)}, {"sparsity": 0.5, "bits": 4}):
        cpu = sparsegpt_prune(W, H, **kwargs)
        gpu = sparsegpt_prune(W.cuda(), H.cuda(), dtype=torch.float64, **kwargs)
        assert gpu.weight.device.type == "cuda"
        assert torch.equal(gpu.mask.cpu(), cpu.mask)
        torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, rtol=0, atol=1e-8)
    f32 = sparsegpt_prune(W.float().cuda(), H.float().cuda(), 0.5)
    assert f32.error == pytest.approx(sparsegpt_prune(W, H, 0.5).error, rel=2e-2)
