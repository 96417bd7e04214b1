import dataclasses
import itertools

import pytest
import torch

from automl_compress.errors import (
    BitsOutOfRangeError,
    InvalidInputError,
    NMPatternError,
    NonFiniteError,
    ShapeMismatchError,
    SparsityOutOfRangeError,
)
from automl_compress.solvers import (
    chita_iht,
    chita_swaps,
    exact_obs_prune,
    magnitude_prune,
    sparsegpt_prune,
)
from automl_compress.solvers.chita import chita_prune
from automl_compress.solvers.exact_obs import channel_major_perm
from automl_compress.solvers.hessian import prepare_hessian
from automl_compress.solvers.lstsq import _padded_support


def _ls_error(A, w, aw, mask):
    """½ (w − v) A (w − v)ᵀ at the least-squares optimum v on ``mask`` (one row)."""
    idx = mask.nonzero().squeeze(1)
    v = torch.zeros_like(w)
    if len(idx):
        v[idx] = torch.linalg.solve(A[idx][:, idx], aw[idx])
    d = w - v
    return float(0.5 * d @ A @ d)


def _brute_force(W, H, k):
    """Per-row optimum over all supports of size k (damp = 0)."""
    best = []
    for r in range(W.shape[0]):
        aw = H @ W[r]
        errs = []
        for S in itertools.combinations(range(W.shape[1]), k):
            m = torch.zeros(W.shape[1], dtype=torch.bool)
            m[list(S)] = True
            errs.append(_ls_error(H, W[r], aw, m))
        best.append(min(errs))
    return torch.tensor(best, dtype=torch.float64)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_brute_force_optimum_is_reached_or_bounded_on_8_columns(make_layer, k):
    """Swaps are a local search: on 8-column rows (all supports enumerated) the result is never
    below the optimum, reaches it on almost every row and on more rows than its warm start."""
    hits, warm_hits, total = 0, 0, 0
    for seed in range(3):
        L = make_layer(12, 8, seed=seed, n=64)
        opt = _brute_force(L.W, L.H, k)
        eo = exact_obs_prune(L.W, L.H, sparsity=1 - k / 8, allocation="uniform", damp=0.0)
        mag = magnitude_prune(L.W, 1 - k / 8, per_row=True)
        for warm, warm_err in ((eo, eo.row_error), (mag.mask, None)):
            res = chita_prune(L.W, L.H, warm_start=warm, damp=0.0)
            assert torch.equal(res.mask.sum(1), torch.full((12,), k))
            assert torch.all(res.row_error >= opt * (1 - 1e-9))
            hits += int((res.row_error <= opt * (1 + 1e-9)).sum())
            if warm_err is not None:
                warm_hits += int((warm_err <= opt * (1 + 1e-9)).sum())
            total += 12
    assert hits >= 0.95 * total
    assert hits / 2 > warm_hits or warm_hits == total / 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sparsity": 0.5},
        {"sparsity": 0.9},
        {"n_m": (2, 4)},
        {"n_m": (1, 4), "kernel_area": 4},
    ],
)
@pytest.mark.parametrize("warm", ["exact_obs", "sparsegpt"])
def test_never_worse_than_the_warm_start_and_keeps_its_counts(make_layer, kwargs, warm):
    L = make_layer(24, 64, seed=3)
    if warm == "exact_obs":
        start = exact_obs_prune(L.W, L.H, **kwargs)
    else:
        start = sparsegpt_prune(L.W, L.H, **kwargs)
    res = chita_prune(L.W, L.H, warm_start=start, **kwargs)
    assert torch.all(res.row_error <= start.row_error)
    assert res.error < start.error  # it does improve these layers
    assert torch.equal(res.mask.sum(1), start.mask.sum(1))
    assert torch.all(res.weight[~res.mask] == 0)
    # the solver-name warm start is the same as passing the solver's result
    named = chita_prune(L.W, L.H, warm_start=warm, **kwargs)
    assert named.info["warm_start"] == warm
    torch.testing.assert_close(named.row_error, res.row_error)


@pytest.mark.parametrize(("n_m", "kernel_area"), [((2, 4), 1), ((1, 4), 4), ((2, 8), 2)])
def test_n_m_pattern_holds_exactly(make_layer, n_m, kernel_area):
    L = make_layer(16, 64, seed=5)
    res = chita_prune(L.W, L.H, n_m=n_m, warm_start="sparsegpt", kernel_area=kernel_area)
    perm = channel_major_perm(64, kernel_area)
    groups = res.mask[:, perm].reshape(16, -1, n_m[1]).sum(2)
    assert torch.all(groups == n_m[0])
    assert int(res.info["swaps"].sum()) > 0


@pytest.mark.parametrize("kwargs", [{"sparsity": 0.7}, {"n_m": (2, 4)}, {"bits": 4}])
def test_row_error_is_output_mse(make_layer, kwargs):
    L = make_layer(16, 32, seed=2)
    res = chita_prune(L.W, L.H, **kwargs)
    assert res.row_error.dtype == torch.float64 and res.weight.dtype == L.W.dtype
    torch.testing.assert_close(res.row_error, L.direct_row_error(res.weight), rtol=1e-6, atol=0)


def test_mask_warm_start_counts_per_row_are_kept(make_layer):
    L = make_layer(10, 32, seed=7)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(10, 32, generator=g) < torch.linspace(0.1, 0.9, 10)[:, None]
    mask[0] = False  # a row with nothing kept
    mask[1] = True  # and a dense one
    res = chita_prune(L.W, L.H, warm_start=mask)
    assert torch.equal(res.mask.sum(1), mask.sum(1))
    assert torch.all(res.weight[0] == 0)
    torch.testing.assert_close(res.weight[1], L.W[1])
    assert torch.all(res.row_error <= res.info["warm_error"])


def test_incremental_swap_state_equals_a_fresh_setup(make_layer):
    """Δ of the chosen swap is the exact change of the objective, and after the rank-2 updates
    Σ, v, s, g, f and the stored entries of B equal a fresh factorisation."""
    L = make_layer(6, 16, seed=1)
    A = prepare_hessian(L.H, 0.01).H
    Ap = chita_swaps.pad(A)
    W = L.W
    AW = W @ A
    wAw = (W * AW).sum(1)
    for n_m in (None, (2, 4)):
        g = torch.Generator().manual_seed(1)
        if n_m is None:
            keep = torch.rand(6, 16, generator=g) < 0.4
        else:
            keep = chita_iht.project(W, torch.ones_like(W, dtype=torch.bool), None, n_m)
        K, Pn = int(keep.sum(1).max()), 16 - int(keep.sum(1).min())
        S, Sv = _padded_support(keep, True, K)
        P, Pv = _padded_support(keep, False, Pn)
        st = chita_swaps._swap_setup(A, Ap, AW, wAw, torch.arange(6), S, Sv, P, Pv, n_m, 100)
        for step in range(4):
            best, a, b, x = chita_swaps._best_swaps(st)
            act = torch.isfinite(best) & (torch.arange(6) != step)  # one row sits out
            for r in range(6):
                cur = torch.zeros(16, dtype=torch.bool)
                cur[st.S[r][st.Sv[r]]] = True
                assert float(st.f[r]) == pytest.approx(_ls_error(A, W[r], AW[r], cur), rel=1e-10)
                if act[r]:
                    new = cur.clone()
                    new[st.S[r, a[r]]] = False
                    new[st.P[r, b[r]]] = True
                    true = _ls_error(A, W[r], AW[r], new) - _ls_error(A, W[r], AW[r], cur)
                    assert float(best[r]) == pytest.approx(true, rel=1e-8, abs=1e-12)
            chita_swaps._apply_swaps(st, A, a, b, x, act)
            st.f.add_(torch.where(act, best, 0.0))
            ref = chita_swaps._swap_setup(A, Ap, AW, wAw, st.rows, st.S, st.Sv, st.P, st.Pv, n_m,
                                         100)
            for name in ("Sig", "v", "s", "g", "f"):
                torch.testing.assert_close(getattr(st, name), getattr(ref, name), rtol=1e-7,
                                           atol=1e-9)
            B = torch.bmm(chita_swaps._block(Ap, st.P, st.Pv, st.S, st.Sv), ref.Sig)
            E = B.gather(1, st.ps[:, :, None].expand(-1, -1, K)).gather(2, st.ss)
            ok = st.Pv.gather(1, st.ps)[:, :, None] & chita_swaps._gather3(st.Sv, st.ss)
            torch.testing.assert_close(st.E * ok, E * ok, rtol=1e-7, atol=1e-9)


def test_iht_line_search_only_lowers_the_objective(make_layer):
    L = make_layer(16, 48, seed=4)
    A = prepare_hessian(L.H, 0.01).H
    AW = L.W @ A
    wAw = (L.W * AW).sum(1)
    mag = magnitude_prune(L.W, 0.75, per_row=True)
    V0 = mag.weight
    k = mag.mask.sum(1)
    allowed = torch.ones_like(mag.mask)
    f0 = chita_iht.objective(V0, V0 @ A, AW, wAw)
    V, keep, it = chita_iht.iht(A, AW, wAw, V0, mag.mask, allowed, k, None, 30, 0.0)
    f1 = chita_iht.objective(V, V @ A, AW, wAw)
    assert it >= 2
    assert torch.all(f1 <= f0) and float(f1.sum()) < 0.7 * float(f0.sum())
    assert torch.equal(keep.sum(1), k) and torch.all(V[~keep] == 0)
    assert bool((keep != mag.mask).any())  # the support moved
    # the active set is respected
    allowed = mag.mask.clone()
    allowed[:, :4] = True
    V, keep, _ = chita_iht.iht(A, AW, wAw, V0, mag.mask, allowed, k, None, 30, 0.0)
    assert not bool((keep & ~allowed).any())


def test_quantized_kept_weights_sit_on_the_grid(make_layer):
    L = make_layer(8, 32, seed=6)
    res = chita_prune(L.W, L.H, sparsity=0.5, bits=3)
    assert res.bits == 3 and res.mask is not None
    codes = res.codes()
    assert torch.all(res.weight[~res.mask] == 0)
    back = (codes.double() - res.zero[:, None].double()) * res.scale[:, None].double()
    torch.testing.assert_close(back, res.weight, rtol=0, atol=1e-12)
    assert res.info["prune_error"].sum() < res.error


def _nan(W, H):
    W = W.clone()
    W[0, 0] = float("nan")
    return W, H


_BAD = [
    (NonFiniteError, _nan, {}),
    (ShapeMismatchError, lambda W, H: (W, H[:8, :8]), {}),
    (SparsityOutOfRangeError, None, {"sparsity": 1.0}),
    (NMPatternError, lambda W, H: (W[:, :6], H[:6, :6]), {"n_m": (2, 4)}),
    (InvalidInputError, None, {"warm_start": "magnitude"}),
    (ShapeMismatchError, None, {"warm_start": torch.ones(4, 8, dtype=torch.bool)}),
    (NMPatternError, None, {"n_m": (2, 4), "warm_start": torch.ones(4, 16, dtype=torch.bool)}),
    (BitsOutOfRangeError, None, {"bits": 1}),
] + [
    (InvalidInputError, None, kw)
    for kw in ({"iht_iters": -1}, {"max_swaps": 1.5}, {"kimp": 0.5}, {"candidates": 0},
               {"refresh": 0}, {"allocation": "rows"}, {"quant": "rtn"}, {"rtol": 1.0})
]


@pytest.mark.parametrize(("error", "inputs", "kwargs"), _BAD)
def test_bad_inputs_raise_named_errors(make_layer, error, inputs, kwargs):
    L = make_layer(4, 16, seed=0)
    W, H = (L.W, L.H) if inputs is None else inputs(L.W, L.H)
    with pytest.raises(error):
        chita_prune(W, H, **kwargs)


def test_dense_result_is_no_warm_start(make_layer):
    L = make_layer(4, 16, seed=0)
    dense = dataclasses.replace(exact_obs_prune(L.W, L.H, 0.5), mask=None)
    with pytest.raises(InvalidInputError, match="dense SolveResult"):
        chita_prune(L.W, L.H, warm_start=dense)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_agrees_with_cpu(make_layer):
    L = make_layer(32, 128, seed=9)
    for kwargs in ({"sparsity": 0.9, "warm_start": "sparsegpt"}, {"n_m": (2, 4)}):
        cpu = chita_prune(L.W, L.H, **kwargs)
        gpu = chita_prune(L.W.cuda(), L.H.cuda(), dtype=torch.float64, **kwargs)
        assert gpu.weight.device.type == "cuda"
        assert torch.equal(gpu.mask.cpu(), cpu.mask)
        torch.testing.assert_close(gpu.row_error.cpu(), cpu.row_error, rtol=1e-6, atol=1e-12)
        f32 = chita_prune(L.W.float().cuda(), L.H.float().cuda(), **kwargs)
        assert torch.all(f32.row_error.cpu() <= f32.info["warm_error"] + 1e-12)
        assert f32.error == pytest.approx(cpu.error, rel=2e-2)
