"""OBQ, GPTQ, joint OBC and the fast mode: exactness, invariants and bad inputs."""


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
from automl_compress.solvers.gptq import column_order
from automl_compress.solvers.hessian import DEFAULT_DAMP, prepare_hessian
from automl_compress.solvers.lazy_inverse import LazyInverse
from automl_compress.solvers.obq import greedy_quantize
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


def _naive_greedy_obq(w, H, scale, zero, maxq, free, outlier_rule=True):
    """OBQ by definition: re-invert H on the free set every step, fix the best weight, refit."""
    w = w.clone()
    free = list(free)
    order = []
    while free:
        Hinv = torch.linalg.inv(H[free][:, free])
        x = w[free]
        q = scale * (torch.clamp(torch.round(x / scale) + zero, 0, maxq) - zero)
        err2 = (x - q) ** 2
        out = (err2 > scale**2 / 4) & outlier_rule
        k = int(torch.argmax(torch.where(out, err2, -1.0))) if bool(out.any()) else int(
            torch.argmin(err2 / torch.diagonal(Hinv))
        )
        # fix free[k] at q[k]; the other free weights move by the OBS correction (an LS refit)
        w[free] = x - (x[k] - q[k]) / Hinv[k, k] * Hinv[:, k]
        w[free[k]] = q[k]
        order.append(free.pop(k))
    return w, order


def _naive_window_greedy(w, H, scale, zero, maxq, order, B, carry, prune):
    """The fast mode by definition: the columns of ``order`` enter B at a time whenever the row
    holds at most ``carry`` entered, unfixed weights; OBQ's greedy may only pick among those, and
    every OBS step corrects every free weight at once, the columns not entered included; weights
    in ``prune`` are fixed to 0 first."""
    w = w.clone()
    free = list(order)
    entered, held = 0, []
    while held or entered < len(order):
        if entered < len(order) and len(held) <= carry:
            held += order[entered:entered + B]
            entered += B
            continue
        Hinv = torch.linalg.inv(H[free][:, free])
        x = w[free]
        q = scale * (torch.clamp(torch.round(x / scale) + zero, 0, maxq) - zero)
        pos = [free.index(c) for c in held]
        cut = [j for j, c in zip(pos, held, strict=True) if prune[c]]
        err2 = (x - q) ** 2
        if cut:
            k = cut[0]
            q[k] = 0.0
        else:
            e2 = err2[pos]
            k = pos[int(torch.argmax(e2))] if bool((e2 > scale**2 / 4).any()) else pos[
                int(torch.argmin(e2 / torch.diagonal(Hinv)[pos]))]
        w[free] = x - (x[k] - q[k]) / Hinv[k, k] * Hinv[:, k]
        w[free[k]] = q[k]
        held.remove(free.pop(k))
    return w


@pytest.mark.parametrize(("block", "carry", "act_order", "masked"), [
    (1, 0, True, False), (4, 0, False, False), (5, 0, True, False), (4, 0, True, True),
    (12, 0, False, True), (3, 4, True, False), (4, 5, False, True), (2, 9, True, True),
])
def test_fast_mode_is_obq_on_a_sliding_window_of_a_fixed_order(
    block, carry, act_order, masked, make_layer
):
    """Optimising the columns not entered yet out of each row's window gives exactly the greedy
    that corrects them at every step (carry 0: blocks, block 1 is GPTQ; carry + block = cols
    is OBQ)."""
    rows, cols = 16, 12
    L = make_layer(rows, cols, seed=21)
    D = torch.linspace(0.4, 2.5, cols, dtype=torch.float64).diag()
    H = D @ L.H @ D  # uneven diag H, so act-order is not the natural order
    W, mask = L.W, None
    if masked:  # the dense weights under the mask: fixing the pruned ones first compensates
        mask = exact_obs_prune(L.W, H, sparsity=0.5).mask
    res = fast_quantize(W, H, 4, block_size=block, carry=carry, act_order=act_order,
                        one_opt_polish=False, mask=mask, dtype=torch.float64)
    Hd = prepare_hessian(H, DEFAULT_DAMP).H
    order = column_order(Hd, act_order).tolist()
    prune = torch.zeros(rows, cols, dtype=torch.bool) if mask is None else ~mask
    for r in range(rows):
        w = _naive_window_greedy(W[r], Hd, res.scale[r], res.zero[r], 15, order, block, carry,
                                 prune[r])
        torch.testing.assert_close(res.weight[r], w, rtol=0, atol=1e-9)
    if block == 1 and carry == 0 and not masked:
        gptq = gptq_quantize(W, H, 4, act_order=act_order, dtype=torch.float64)
        assert torch.equal(res.codes(), gptq.codes())


@pytest.mark.parametrize(("block", "carry"), [(24, 0), (4, 20), (24, 16)])
def test_fast_mode_at_full_width_is_obq_and_1_opt_only_lowers_it(block, carry, make_layer):
    L = make_layer(10, 24, seed=22)
    obq = obq_quantize(L.W, L.H, 4, dtype=torch.float64)
    full = fast_quantize(L.W, L.H, 4, block_size=block, carry=carry, act_order=False,
                         one_opt_polish=False, dtype=torch.float64)
    assert torch.equal(full.codes(), obq.codes())
    polished = fast_quantize(L.W, L.H, 4, block_size=block, carry=carry, act_order=False,
                             dtype=torch.float64)
    assert torch.all(polished.row_error <= obq.row_error + 1e-15)


def test_obq_first_step_is_the_brute_force_best_single_fix(make_layer):
    """The solver's own first choice in every row is the (weight, grid value) whose LS refit
    costs least, and its weights after that step are that refit. On these rows the best fix is
    not always the weight nearest its grid point, so a score without [H⁻¹]_jj is caught."""
    rows, cols = 16, 6
    L = make_layer(rows, cols, seed=3)
    D = torch.linspace(0.3, 3.0, cols, dtype=torch.float64).diag()
    H = D @ L.H @ D  # the inputs rescaled per column: uneven [H⁻¹]_jj, correlations kept
    res = obq_quantize(L.W, H, 3, damp=0.0, outlier_rule=False)
    s, z = res.scale.double(), res.zero.double()
    inv = LazyInverse(L.W / s[:, None], torch.linalg.inv(H).expand(rows, cols, cols).clone(),
                      rank=4, compact=False)
    greedy_quantize(inv, -z[:, None], 7 - z[:, None], 1, outlier_rule=False)
    nearest_differs = 0
    for r in range(rows):
        w = L.W[r]
        q = s[r] * (torch.clamp(torch.round(w / s[r]) + z[r], 0, 7) - z[r])
        losses = []
        for j in range(cols):
            free = [k for k in range(cols) if k != j]
            cand = w.clone()
            cand[free] = torch.linalg.solve(H[free][:, free], H[free] @ w - H[free, j] * q[j])
            cand[j] = q[j]
            d = cand - w
            losses.append((float(0.5 * d @ H @ d), cand))
        best = min(range(cols), key=lambda j: losses[j][0])
        nearest_differs += best != int((w - q).abs().argmin())
        assert torch.nonzero(inv.diag[r] == -1).flatten().tolist() == [best], r  # fixed: diag −1
        torch.testing.assert_close(inv.w[r] * s[r], losses[best][1], rtol=0, atol=1e-10)
    assert nearest_differs > 0


@pytest.mark.parametrize("outlier_rule", [False, True])
def test_obq_is_the_greedy_of_its_definition(outlier_rule, make_layer):
    """Lazy downdates, the active set and row batches reproduce the naive re-inverting greedy."""
    L = make_layer(6, 20, seed=4)
    res = obq_quantize(L.W, L.H, 3, damp=0.0, outlier_rule=outlier_rule, lazy_rank=3,
                       row_batch=4)
    for r in range(6):
        w, _ = _naive_greedy_obq(L.W[r], L.H, res.scale[r], res.zero[r], 7, range(20),
                                 outlier_rule)
        torch.testing.assert_close(res.weight[r], w, rtol=0, atol=1e-9)


def test_obq_is_independent_of_the_row_batch_the_lazy_rank_and_the_active_set(make_layer):
    L = make_layer(10, 40, seed=5)
    a = obq_quantize(L.W, L.H, 3, row_batch=10, lazy_rank=1, active_set=False)
    for rank, batch, act in ((2, 3, True), (7, 4, False), (32, 10, True), (64, 1, True)):
        lazy = obq_quantize(L.W, L.H, 3, row_batch=batch, lazy_rank=rank, active_set=act)
        assert torch.equal(lazy.codes(), a.codes()), (rank, batch, act)
    masked = exact_obs_prune(L.W, L.H, n_m=(2, 4))
    eager = obq_quantize(masked.weight, L.H, 3, mask=masked.mask, lazy_rank=1)
    lazy = obq_quantize(masked.weight, L.H, 3, mask=masked.mask, lazy_rank=16, row_batch=3)
    assert torch.equal(eager.codes(), lazy.codes())


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


def test_obq_with_a_mask_that_prunes_whole_rows_or_everything(make_layer):
    L = make_layer(6, 16, seed=8)
    none = obq_quantize(L.W, L.H, 4, mask=torch.zeros_like(L.W, dtype=torch.bool))
    assert torch.all(none.weight == 0)
    keep = torch.ones_like(L.W, dtype=torch.bool)
    keep[2] = False  # one row pruned whole, the others dense
    some = obq_quantize(L.W, L.H, 4, mask=keep)
    dense = obq_quantize(L.W, L.H, 4)
    assert torch.all(some.weight[2] == 0)
    assert torch.allclose(some.weight[keep[:, 0]], dense.weight[keep[:, 0]], atol=1e-6)


def test_obq_with_mask_is_the_greedy_on_each_rows_support(make_layer):
    """Rows with different supports (one keeps a single weight) are each the naive greedy on
    their own kept weights, started from the least-squares optimum on that support."""
    L = make_layer(3, 8, seed=7)
    keep = torch.tensor([[True] * 8, [True, False] * 4, [False] * 7 + [True]])
    res = obq_quantize(L.W, L.H, 2, mask=keep, damp=0.0)
    assert torch.all(res.weight[~keep] == 0)
    for r in range(3):
        S = torch.nonzero(keep[r]).flatten().tolist()
        v = torch.zeros(8, dtype=torch.float64)
        v[S] = torch.linalg.solve(L.H[S][:, S], (L.H @ L.W[r])[S])  # LS optimum on S
        w, _ = _naive_greedy_obq(v, L.H, res.scale[r], res.zero[r], 3, S)
        torch.testing.assert_close(res.weight[r], w, rtol=0, atol=1e-9)


def _naive_fixed_order(W, H, targets):
    """Fix columns left to right; after each, refit the later columns by least squares."""
    W = W.clone()
    cols = W.shape[1]
    for i in range(cols):
        t = targets(i, W[:, i])
        later = list(range(i + 1, cols))
        if later:
            delta = (W[:, i] - t)[:, None] * (H[later, i] @ torch.linalg.inv(H[later][:, later]))
            W[:, later] += delta
        W[:, i] = t
    return W


def test_gptq_is_the_fixed_order_optimum_and_honours_the_mask(make_layer):
    L = make_layer(12, 24, seed=8)
    mask = magnitude_prune(L.W, n_m=(2, 4)).mask
    res = gptq_quantize(L.W, L.H, 4, mask=mask, damp=0.0, block_size=5)
    assert torch.all(res.weight[~mask] == 0)
    assert torch.equal(res.mask, mask)
    s, z = res.scale[:, None].squeeze(1), res.zero

    def target(i, w):
        q = s * (torch.clamp(torch.round(w / s) + z, 0, 15) - z)
        return torch.where(mask[:, i], q, torch.zeros_like(q))

    naive = _naive_fixed_order(torch.where(mask, L.W, torch.zeros_like(L.W)), L.H, target)
    torch.testing.assert_close(res.weight, naive, rtol=0, atol=1e-9)
    # the losses it reports are those weights' output errors against the dense W, from X
    torch.testing.assert_close(res.row_error.double(), L.direct_row_error(naive), rtol=1e-9,
                               atol=1e-12)


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


def test_one_opt_ends_every_row_at_a_local_optimum_of_single_steps(make_layer):
    """Rows leave the sweeps when they stop improving; none may leave early: after the polish no
    ±1 move of any free weight lowers any row's error (checked move by move)."""
    L = make_layer(24, 16, seed=23)
    g = gptq_quantize(L.W, L.H, 3)
    keep = torch.rand(L.W.shape, generator=torch.Generator().manual_seed(0)) > 0.2
    W_hat = one_opt(L.W, g.weight * keep, L.H, g.scale, g.zero, 3, mask=keep)
    assert torch.all(W_hat[~keep] == 0)
    codes = torch.round(W_hat / g.scale[:, None] + g.zero[:, None])
    base = L.direct_row_error(W_hat)
    for r in range(L.W.shape[0]):
        for j in range(L.W.shape[1]):
            for step in (-1.0, 1.0):
                if not keep[r, j] or not 0 <= codes[r, j] + step <= 7:
                    continue
                moved = W_hat.clone()
                moved[r, j] += step * g.scale[r]
                assert L.direct_row_error(moved)[r] >= base[r] - 1e-12 * base[r], (r, j, step)


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


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_agrees_with_cpu(make_layer):
    L = make_layer(64, 64, seed=16)
    for fn in (obq_quantize, gptq_quantize, fast_quantize):
        cpu = fn(L.W, L.H, 4)
        gpu = fn(L.W.cuda(), L.H.cuda(), 4, dtype=torch.float64)
        assert gpu.error == pytest.approx(cpu.error, rel=1e-6)
