"""OBQ, GPTQ, joint OBC and the fast mode: exactness, invariants and bad inputs."""

import itertools

import pytest
import torch

from automl_compress.errors import (
    BitsOutOfRangeError,
    HessianNotPSDError,
    NonFiniteError,
    ShapeMismatchError,
)
from automl_compress.solvers import (
    exact_obs_prune,
    gptq_quantize,
    magnitude_prune,
    obc_compress,
    obq_quantize,
    rtn_quantize,
)
from automl_compress.solvers.obq import LazyInverse, _obq_batch, obs_fix
from automl_compress.solvers.refine import fast_quantize, one_opt


def _on_grid(res):
    codes = res.weight / res.scale[:, None] + res.zero[:, None]
    return torch.allclose(codes, codes.round(), atol=1e-6) and bool(
        ((codes.round() >= 0) & (codes.round() <= 2**res.bits - 1)).all()
    )


SOLVERS = {
    "obq": lambda L, b: obq_quantize(L.W, L.H, b),
    "gptq": lambda L, b: gptq_quantize(L.W, L.H, b),
    "gptq_act": lambda L, b: gptq_quantize(L.W, L.H, b, act_order=True, block_size=8),
    "fast": lambda L, b: fast_quantize(L.W, L.H, b),
    "obc_2_4": lambda L, b: obc_compress(L.W, L.H, b, n_m=(2, 4)),
    "obc_50": lambda L, b: obc_compress(L.W, L.H, b, sparsity=0.5, allocation="uniform"),
    "obc_gptq": lambda L, b: obc_compress(L.W, L.H, b, n_m=(2, 4), quant="gptq"),
}


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("bits", [3, 4])
def test_row_error_is_the_output_mse_and_weights_lie_on_the_grid(name, bits, make_layer):
    L = make_layer(20, 32, seed=bits)
    res = SOLVERS[name](L, bits)
    assert res.weight.dtype == L.W.dtype and res.weight.shape == L.W.shape
    assert torch.allclose(res.row_error, L.direct_row_error(res.weight), rtol=1e-4, atol=1e-12)
    assert _on_grid(res)
    assert res.bits == bits


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_second_order_solvers_beat_round_to_nearest(bits, make_layer):
    L = make_layer(32, 48, seed=10 + bits)
    rtn = rtn_quantize(L.W, bits, H=L.H).error
    obq = obq_quantize(L.W, L.H, bits).error
    gptq = gptq_quantize(L.W, L.H, bits).error
    fast = fast_quantize(L.W, L.H, bits).error
    assert obq < rtn and gptq < rtn
    assert fast <= gptq + 1e-12


def test_obq_step_is_the_exact_optimum_of_fixing_one_weight(make_layer):
    """The first greedy step equals brute force over every (weight, grid value) with LS refit."""
    L = make_layer(1, 6, seed=3)
    res = obq_quantize(L.W, L.H, 3, damp=0.0, outlier_rule=False)
    scale, zero = res.scale.double(), res.zero.double()
    w = L.W[0].clone()
    H = L.H
    best = (float("inf"), None)
    for j in range(6):
        q = scale * (torch.clamp(torch.round(w[j] / scale) + zero, 0, 7) - zero)
        free = [k for k in range(6) if k != j]
        # least-squares refit of the free weights with w_j fixed to q
        rhs = H[free][:, free] @ w[free] + H[free, j] * (w[j] - q)
        v = torch.linalg.solve(H[free][:, free], rhs)
        cand = w.clone()
        cand[free] = v
        cand[j] = q
        d = cand - w
        loss = float(0.5 * d @ H @ d)
        if loss < best[0]:
            best = (loss, (j, cand))
    inv = LazyInverse(torch.linalg.inv(H)[None].clone(), rank=1)
    wb = w[None].clone()
    # one step of the batched solver
    qv = scale * (torch.clamp(torch.round(wb / scale) + zero, 0, 7) - zero)
    score = (wb - qv) ** 2 / inv.diag
    p = score.argmin(dim=1)
    free_mask = torch.ones_like(wb, dtype=torch.bool)
    loss = obs_fix(wb, inv, free_mask, p, qv[0, p], torch.tensor([True]))
    assert int(p) == best[1][0]
    assert float(loss) == pytest.approx(best[0], rel=1e-9)
    assert torch.allclose(wb[0], best[1][1], atol=1e-10)


def test_obq_step_losses_sum_to_the_damped_error(make_layer):
    L = make_layer(8, 16, seed=4)
    res = obq_quantize(L.W, L.H, 4, damp=0.0)
    assert torch.allclose(res.info["step_loss_sum"], res.row_error, rtol=1e-8)


def test_obq_is_independent_of_the_row_batch_and_the_lazy_rank(make_layer):
    L = make_layer(10, 40, seed=5)
    a = obq_quantize(L.W, L.H, 3, row_batch=10, lazy_rank=1)
    b = obq_quantize(L.W, L.H, 3, row_batch=3, lazy_rank=1)
    assert torch.equal(a.weight, b.weight)
    for rank in (2, 7, 32, 64):
        lazy = obq_quantize(L.W, L.H, 3, row_batch=4, lazy_rank=rank)
        assert torch.equal(lazy.weight, a.weight), rank
        assert torch.allclose(lazy.info["step_loss_sum"], a.info["step_loss_sum"], rtol=1e-9)
    masked = exact_obs_prune(L.W, L.H, n_m=(2, 4))
    eager = obq_quantize(masked.weight, L.H, 3, mask=masked.mask, lazy_rank=1)
    lazy = obq_quantize(masked.weight, L.H, 3, mask=masked.mask, lazy_rank=16)
    assert torch.equal(eager.weight, lazy.weight)


def test_obq_with_mask_keeps_zeros_and_beats_rtn_on_the_mask(make_layer):
    L = make_layer(16, 32, seed=6)
    pruned = exact_obs_prune(L.W, L.H, sparsity=0.5)
    res = obq_quantize(pruned.weight, L.H, 4, mask=pruned.mask)
    assert torch.all(res.weight[~pruned.mask] == 0)
    rtn = rtn_quantize(pruned.weight, 4, H=L.H)
    rtn_w = torch.where(pruned.mask, rtn.weight, torch.zeros_like(rtn.weight))
    err_rtn = float(L.direct_row_error(rtn_w).sum())
    err_obq = float(L.direct_row_error(res.weight).sum())
    assert err_obq < err_rtn


def test_obq_with_mask_matches_brute_force_on_a_tiny_row(make_layer):
    """With a 2-of-4 mask and 2 bits, no assignment of the kept weights to the grid is better
    than OBQ by more than the greedy gap; and OBQ is optimal among the LS-refitted orders."""
    L = make_layer(1, 4, seed=7)
    mask = torch.tensor([[True, False, True, False]])
    res = obq_quantize(L.W, L.H, 2, mask=mask, damp=0.0)
    s, z = float(res.scale), float(res.zero)
    best = float("inf")
    for c0, c2 in itertools.product(range(4), repeat=2):
        cand = torch.zeros(1, 4, dtype=torch.float64)
        cand[0, 0] = s * (c0 - z)
        cand[0, 2] = s * (c2 - z)
        best = min(best, float(L.direct_row_error(cand)))
    assert res.error >= best - 1e-12
    assert res.error <= 4 * best + 1e-12


def test_gptq_losses_and_mask(make_layer):
    L = make_layer(12, 24, seed=8)
    mask = magnitude_prune(L.W, n_m=(2, 4)).mask
    res = gptq_quantize(L.W, L.H, 4, mask=mask)
    assert torch.all(res.weight[~mask] == 0)
    assert torch.equal(res.mask, mask)


def test_gptq_block_size_does_not_change_the_result(make_layer):
    L = make_layer(6, 40, seed=9)
    a = gptq_quantize(L.W, L.H, 3, block_size=128)
    b = gptq_quantize(L.W, L.H, 3, block_size=7)
    assert torch.allclose(a.weight, b.weight, atol=1e-12)


def test_obc_respects_patterns_and_costs_at_least_the_pruning(make_layer):
    L = make_layer(16, 32, seed=11)
    nm = obc_compress(L.W, L.H, 4, n_m=(2, 4))
    assert torch.all(nm.mask.reshape(16, -1, 4).sum(-1) == 2)
    assert torch.all(nm.weight[~nm.mask] == 0)
    prune_only = exact_obs_prune(L.W, L.H, n_m=(2, 4)).error
    assert nm.error >= prune_only - 1e-12
    un = obc_compress(L.W, L.H, 4, sparsity=0.25, allocation="uniform")
    assert torch.all((un.weight == 0).sum(1) >= 8)
    assert torch.all((~un.mask).sum(1) == 8)


def test_one_opt_never_increases_any_row_error(make_layer):
    L = make_layer(16, 32, seed=12)
    g = gptq_quantize(L.W, L.H, 3)
    polished = one_opt(L.W, g.weight, L.H, g.scale, g.zero, 3)
    before = L.direct_row_error(g.weight)
    after = L.direct_row_error(polished)
    assert torch.all(after <= before + 1e-12)
    assert float(after.sum()) < float(before.sum())


def test_zero_bits_removes_every_row(make_layer):
    L = make_layer(4, 8)
    for fn in (obq_quantize, gptq_quantize, fast_quantize):
        res = fn(L.W, L.H, 0)
        assert torch.count_nonzero(res.weight) == 0
        assert torch.allclose(res.row_error, 0.5 * ((L.W @ L.H) * L.W).sum(1))


def test_dead_inputs_are_free(make_layer):
    L = make_layer(6, 12, seed=13)
    X = L.X.clone()
    X[:, 3] = 0.0
    H = 2 * X.T @ X / X.shape[0]
    for res in (obq_quantize(L.W, H, 4), gptq_quantize(L.W, H, 4)):
        direct = (((L.W - res.weight) @ X.T) ** 2).sum(1) / X.shape[0]
        assert torch.allclose(res.row_error, direct, rtol=1e-6)


def test_float32_inputs_give_float32_outputs_and_similar_error(make_layer):
    L = make_layer(8, 16, seed=14)
    r64 = obq_quantize(L.W, L.H, 4)
    r32 = obq_quantize(L.W.float(), L.H.float(), 4)
    assert r32.weight.dtype == torch.float32
    assert r32.error == pytest.approx(r64.error, rel=1e-3)


@pytest.mark.parametrize("fn", [obq_quantize, gptq_quantize, fast_quantize])
def test_bad_inputs_raise_named_errors(fn, make_layer):
    L = make_layer(4, 8)
    with pytest.raises(BitsOutOfRangeError):
        fn(L.W, L.H, 1)
    with pytest.raises(ShapeMismatchError):
        fn(L.W, L.H[:4, :4], 4)
    bad = L.W.clone()
    bad[1, 1] = float("inf")
    with pytest.raises(NonFiniteError):
        fn(bad, L.H, 4)
    badH = L.H.clone()
    badH[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        fn(L.W, badH, 4)
    negH = -torch.eye(8, dtype=torch.float64) * 5 + 0.1 * torch.ones(8, 8, dtype=torch.float64)
    with pytest.raises(HessianNotPSDError, match="negative diagonal"):
        fn(L.W, negH, 4, damp=0.0)
    indefinite = torch.eye(8, dtype=torch.float64) + 3.0 * torch.ones(8, 8, dtype=torch.float64)
    indefinite -= 6.0 * torch.eye(8, dtype=torch.float64) * (torch.arange(8) % 2 == 0)
    indefinite = indefinite.abs().fill_diagonal_(1.0)
    with pytest.raises(HessianNotPSDError, match="positive definite"):
        fn(L.W, indefinite, 4, damp=0.0)


def test_batch_helper_handles_rows_with_nothing_left(make_layer):
    """Rows whose free set empties early are left untouched by later steps."""
    L = make_layer(2, 6, seed=15)
    keep = torch.tensor([[True] * 6, [True, False, False, False, False, False]])
    Hinv = torch.linalg.inv(L.H)[None].expand(2, 6, 6).clone()
    w = torch.where(keep, L.W, torch.zeros_like(L.W)).clone()
    s = torch.full((2,), 0.05, dtype=torch.float64)
    z = torch.full((2,), 8.0, dtype=torch.float64)
    _obq_batch(w, Hinv, s, z, 15, keep, True)
    assert torch.all(w[1, 1:] == 0)
    codes = w / s[:, None] + z[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-9)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_agrees_with_cpu(make_layer):
    L = make_layer(64, 64, seed=16)
    for fn in (obq_quantize, gptq_quantize, fast_quantize):
        cpu = fn(L.W, L.H, 4)
        gpu = fn(L.W.cuda(), L.H.cuda(), 4, dtype=torch.float64)
        assert gpu.error == pytest.approx(cpu.error, rel=1e-6)
