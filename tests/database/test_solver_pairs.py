"""Every (solver.quant, solver.prune) pair builds a layer through the registry and is honoured."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from _layers import make_layer

from automl_compress.capture import LayerHessian
from automl_compress.config import MenuConfig, SolverConfig
from automl_compress.database import solve, work
from automl_compress.solvers import fast_quantize, obq_quantize, registry
from automl_compress.solvers.registry import PruneSolver, QuantSolver, SolveOptions
from automl_compress.specs import LayerInfo

PAIRS = list(itertools.product(QuantSolver, PruneSolver))
MENU = MenuConfig(bits=(0, 3, 4), patterns=("dense", "2:4", "50%"))


@pytest.fixture(scope="module")
def layer():
    L = make_layer(8, 16, seed=21)
    info = LayerInfo(name="fc", kind="linear", rows=8, cols=16)
    return L, info, LayerHessian("fc", info, L.H[None], L.X.shape[0], L.X.mean(0, keepdim=True))


@pytest.mark.parametrize(("quant", "prune"), PAIRS, ids=[f"{q}+{p}" for q, p in PAIRS])
def test_every_option_runs_the_configured_pair(quant, prune, layer, monkeypatch):
    """The layer's options come from exactly the configured solvers, and each stored entry is
    the registry's solution of that option (so the pair is honoured, not a fixed fallback)."""
    L, info, lh = layer
    cfg = SolverConfig(quant=str(quant), prune=str(prune))
    calls = []
    for table, key in [(registry.QUANT, k) for k in QuantSolver] + [
        (registry.PRUNE, k) for k in PruneSolver
    ]:
        fn = table[key]
        monkeypatch.setitem(table, key, lambda *a, _f=fn, _k=key: calls.append(_k) or _f(*a))
    for pair, fn in list(registry.JOINT.items()):
        monkeypatch.setitem(
            registry.JOINT, pair, lambda *a, _f=fn, _p=pair: calls.append(_p) or _f(*a)
        )
    sol = solve.solve_layer(info, L.W.float(), lh, MENU, cfg)
    joint = (prune, quant) in registry.JOINT
    used = set(calls)
    expected = {quant} | ({(prune, quant)} if joint else {prune})
    assert used == expected, (used, expected)
    for (pattern, bits), opt in sol.options.items():
        opts = work.solve_options(pattern, bits, cfg)
        ref = registry.solve(L.W.float(), L.H, opts, quant, prune)
        W_hat = opt.weight(sol.blocks).to(torch.float64)
        torch.testing.assert_close(W_hat, ref.weight.double(), rtol=0, atol=1e-6)
        if pattern != "dense":
            assert torch.equal(opt.mask, ref.mask)
            kept = opt.mask.sum(1)
            assert torch.all(kept == kept[0])  # one exact count per row


def test_sparse_options_honour_the_quantizer():
    """Regression: sparse options used to run OBQ whatever solver.quant said."""
    L = make_layer(8, 16, seed=22)
    W = L.W.float()
    opts = SolveOptions(bits=3, sparsity=0.5, polish=False)
    pruned = registry.prune(W, L.H, opts, PruneSolver.EXACT_OBS)
    for quant in QuantSolver:
        res = registry.solve(W, L.H, opts, quant, PruneSolver.EXACT_OBS, pruned)
        direct = registry.QUANT[quant](pruned.weight, L.H, opts, pruned.mask)
        assert torch.equal(res.weight, direct.weight), quant
    obq = registry.solve(W, L.H, opts, QuantSolver.OBQ, PruneSolver.EXACT_OBS, pruned)
    gptq = registry.solve(W, L.H, opts, QuantSolver.GPTQ, PruneSolver.EXACT_OBS, pruned)
    assert not torch.equal(obq.weight, gptq.weight)


def test_row_batch_reaches_every_solver_or_is_refused(monkeypatch):
    """``row_batch`` is passed to the solvers that batch rows; SparseGPT's joint-over-rows masks
    refuse it with a named error instead of dropping it."""
    L = make_layer(8, 16, seed=23)
    W = L.W.float()
    seen = {}
    import automl_compress.solvers.registry as reg

    for name in ("obq_quantize", "gptq_quantize", "fast_quantize", "exact_obs_prune"):
        fn = getattr(reg, name)

        def spy(*a, _f=fn, _n=name, **k):
            seen[_n] = k["row_batch"]
            return _f(*a, **k)

        monkeypatch.setattr(reg, name, spy)
    opts = SolveOptions(bits=3, sparsity=0.5, row_batch=3)
    for quant in QuantSolver:
        reg.solve(W, L.H, dataclasses.replace(opts, sparsity=None), quant, PruneSolver.EXACT_OBS)
    reg.prune(W, L.H, opts, PruneSolver.EXACT_OBS)
    assert seen == {n: 3 for n in seen} and len(seen) == 4
    global_opts = dataclasses.replace(opts, allocation="global")
    with pytest.raises(reg.InvalidInputError, match="row_batch"):
        reg.prune(W, L.H, global_opts, PruneSolver.SPARSEGPT)


def test_fast_mode_takes_over_above_the_configured_time():
    cfg = SolverConfig(quant="obq", exact_max_s=1.0)
    assert work.quant_solver(cfg, 64, 64) is QuantSolver.OBQ
    assert work.quant_solver(cfg, 4096, 4096) is QuantSolver.FAST
    assert work.quant_solver(SolverConfig(quant="obq"), 4096, 4096) is QuantSolver.OBQ


def test_solver_fast_carry_reaches_the_fast_mode():
    """The configured window is the one the fast mode runs (carry 0 and 6 differ on this
    layer, so a dropped setting shows)."""
    L = make_layer(12, 40, seed=25)
    W = L.W.float()
    codes = {}
    for carry in (0, 6):
        opts = work.solve_options("dense", 3, SolverConfig(quant="fast", fast_carry=carry))
        assert opts.carry == carry
        res = registry.solve(W, L.H, opts, QuantSolver.FAST, PruneSolver.EXACT_OBS)
        direct = fast_quantize(W, L.H, 3, carry=carry, damp=opts.damp, grid=opts.grid)
        assert torch.equal(res.codes(), direct.codes())
        codes[carry] = res.codes()
    assert not torch.equal(codes[0], codes[6])


@pytest.mark.parametrize("pattern", [{"n_m": (2, 4)}, {"sparsity": 0.5}])
def test_chita_through_the_registry_refines_exact_obs(pattern):
    """solver.prune 'chita' starts from ExactOBS's mask with the same per-row counts and never
    ends above it on the pruning error (on N:M it must end strictly below on this layer)."""
    L = make_layer(16, 32, seed=24)
    W = L.W.double()
    opts = SolveOptions(bits=4, **pattern)
    eo = registry.prune(W, L.H, opts, PruneSolver.EXACT_OBS)
    ch = registry.prune(W, L.H, opts, PruneSolver.CHITA)
    assert torch.equal(ch.mask.sum(1), eo.mask.sum(1))
    assert torch.all(ch.row_error <= eo.row_error + 1e-9)
    if "n_m" in pattern:
        assert ch.row_error.sum() < eo.row_error.sum()


POLISH_CASES = [(q, {}, PruneSolver.EXACT_OBS) for q in QuantSolver] + [
    (q, {"sparsity": 0.5}, p) for q in QuantSolver for p in (PruneSolver.EXACT_OBS,
                                                             PruneSolver.SPARSEGPT)]


@pytest.mark.parametrize(("quant", "pattern", "prune"), POLISH_CASES)
def test_polish_only_lowers_the_row_errors_and_is_off_when_asked(quant, pattern, prune):
    """solver.polish runs 1-opt after every quantization solver: no row ends above the plain
    solver (against the dense W, also on SparseGPT's masks, whose weights are not the
    least-squares optimum the quantizer starts from), the layer ends below it here, and
    polish=False is the plain solver itself."""
    L = make_layer(16, 32, seed=25)
    W = L.W.float()
    plain = SolveOptions(bits=3, polish=False, **pattern)
    a = registry.solve(W, L.H, plain, quant, prune)
    b = registry.solve(W, L.H, dataclasses.replace(plain, polish=True), quant, prune)
    assert torch.all(b.row_error <= a.row_error * (1 + 1e-9))
    assert b.error < a.error
    if quant is QuantSolver.OBQ and not pattern:  # the paper's greedy, as it is
        assert torch.equal(a.weight, obq_quantize(W, L.H, 3, grid=plain.grid).weight)
    if pattern:
        assert torch.equal(b.mask, a.mask) and torch.all(b.weight[~b.mask] == 0)
    cfg = SolverConfig(quant=str(quant), polish=False)
    assert work.solve_options("dense", 3, cfg).polish is False


FIXED_ORDER = [(QuantSolver.GPTQ, PruneSolver.SPARSEGPT), (QuantSolver.FAST, PruneSolver.SPARSEGPT),
               (QuantSolver.GPTQ, PruneSolver.EXACT_OBS)]


@pytest.mark.parametrize(("quant", "prune"), FIXED_ORDER, ids=[f"{q}+{p}" for q, p in FIXED_ORDER])
@pytest.mark.parametrize("pattern", ["dense", "2:4", "50%"])
def test_a_unit_factors_its_h_once_for_every_bit_width_with_the_same_codes(
        quant, prune, pattern, monkeypatch):
    """The fixed-order solvers of one unit share H's inverse factor, and nothing else changes."""
    from automl_compress.solvers import hessian

    L = make_layer(8, 16, seed=24)
    cfg = SolverConfig(quant=str(quant), prune=str(prune))
    bits = (2, 3, 4)
    alone = [[solve._piece_solution(b, registry.solve(
        L.W.float(), L.H, work.solve_options(pattern, b, cfg), quant, prune))] for b in bits]
    calls = []
    real = hessian.upper_cholesky_of_inverse
    monkeypatch.setattr(hessian, "upper_cholesky_of_inverse",
                        lambda prep: calls.append(1) or real(prep))
    shared = solve.solve_unit(L.W, L.H, pattern, bits, cfg)
    # one factor per column order: the fast mode sweeps in act-order, SparseGPT's mask pass in
    # the natural order
    assert len(calls) == (2 if quant is QuantSolver.FAST and pattern != "dense" else 1)
    for (b, q, s, z, m), [(b0, q0, s0, z0, m0)] in zip(shared, alone, strict=True):
        assert b == b0 and torch.equal(q, q0) and torch.equal(s, s0) and torch.equal(z, z0)
        assert (m is None and m0 is None) or torch.equal(m, m0)


def test_inverse_factors_refuse_another_h():
    from automl_compress.solvers.hessian import InverseFactors

    L = make_layer(4, 8, seed=25)
    factors = InverseFactors(L.H)
    with pytest.raises(ValueError, match="the same H"):
        registry.solve(L.W.float(), L.H.clone(), SolveOptions(bits=3, factors=factors),
                       QuantSolver.GPTQ, PruneSolver.SPARSEGPT)
