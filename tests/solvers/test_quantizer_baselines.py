import pytest
import torch
from _layers import gaussian_layer

from automl_compress.errors import (
    BitsOutOfRangeError,
    NMPatternError,
    NonFiniteError,
    ShapeMismatchError,
    SparsityOutOfRangeError,
)
from automl_compress.solvers import GridSpec, fit_grid, magnitude_prune, rtn_quantize


def _layer(rows=16, cols=32, n=512, seed=0):
    return gaussian_layer(rows, cols, n, seed)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("search", ["mse", "minmax"])
def test_grid_holds_zero_and_values_lie_on_it(bits, symmetric, search):
    W, _, _ = _layer()
    g = fit_grid(W, bits, GridSpec(symmetric=symmetric, search=search))
    assert torch.all(g.scale > 0)
    assert torch.all((g.zero >= 0) & (g.zero <= 2**bits - 1))
    assert torch.equal(g.quantize(torch.zeros_like(W)), torch.zeros_like(W))
    q = g.quantize(W)
    codes = q / g.scale[:, None] + g.zero[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-9)
    assert len(torch.unique(codes.round())) <= 2**bits


def test_mse_search_is_no_worse_than_minmax():
    W, _, _ = _layer(seed=1)
    for bits in (2, 3, 4):
        e_mse = (fit_grid(W, bits, GridSpec(search="mse")).quantize(W) - W).abs().pow(2.4).sum(1)
        e_mm = (fit_grid(W, bits, GridSpec(search="minmax")).quantize(W) - W).abs().pow(2.4).sum(1)
        assert torch.all(e_mse <= e_mm + 1e-12)


def test_rtn_row_error_matches_output_mse_and_codes_round_trip():
    W, X, H = _layer()
    res = rtn_quantize(W, 4, H=H)
    direct = (((W - res.weight) @ X.T) ** 2).sum(1) / X.shape[0]
    assert torch.allclose(res.row_error, direct, rtol=1e-6)
    rebuilt = res.scale[:, None] * (res.codes().double() - res.zero[:, None])
    assert torch.allclose(rebuilt, res.weight)
    assert rtn_quantize(W, 8, H=H).error < rtn_quantize(W, 2, H=H).error
    assert rtn_quantize(W, 4).row_error is None
    assert torch.count_nonzero(rtn_quantize(W, 0).weight) == 0


def test_magnitude_prune_exact_counts_and_nm():
    W, _, H = _layer()
    res = magnitude_prune(W, 0.5, H=H)
    assert int((~res.mask).sum()) == W.numel() // 2
    row = magnitude_prune(W, 0.25, per_row=True)
    assert torch.all((~row.mask).sum(1) == 8)
    nm = magnitude_prune(W, n_m=(2, 4), H=H)
    assert torch.all(nm.mask.reshape(16, -1, 4).sum(-1) == 2)
    kept = W.abs().where(nm.mask, torch.zeros_like(W)).reshape(16, -1, 4)
    dropped = W.abs().where(~nm.mask, torch.zeros_like(W)).reshape(16, -1, 4)
    assert torch.all(kept.max(-1).values >= dropped.max(-1).values)


def test_bad_inputs_raise_named_errors():
    W, _, H = _layer()
    with pytest.raises(BitsOutOfRangeError, match="found 1"):
        rtn_quantize(W, 1)
    with pytest.raises(BitsOutOfRangeError):
        rtn_quantize(W, 9)
    with pytest.raises(SparsityOutOfRangeError, match=r"\[0, 1\)"):
        magnitude_prune(W, 1.0)
    with pytest.raises(NMPatternError, match="cols % 5"):
        magnitude_prune(W, n_m=(2, 5))
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        rtn_quantize(bad, 4)
    with pytest.raises(ShapeMismatchError, match="match W's 32 columns"):
        rtn_quantize(W, 4, H=H[:-1, :-1])
    with pytest.raises(ShapeMismatchError, match="2-D"):
        rtn_quantize(W[0], 4)
