"""bench/optimality_gap.py's exact optima are exact: they match exhaustive enumeration."""

import itertools
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.optimality_gap import best_codes, nm_supports, prune_optimum  # noqa: E402


def test_branch_and_bound_finds_the_enumerated_optimum():
    rng = np.random.default_rng(0)
    for _ in range(5):
        A = rng.normal(size=(5, 5))
        H = A @ A.T + 0.1 * np.eye(5)
        R = np.linalg.cholesky(H).T
        t = rng.normal(scale=2.0, size=5)
        brute = min(
            float(np.sum((R @ (np.array(c) - t)) ** 2))
            for c in itertools.product(range(-2, 2), repeat=5)
        )
        _, val, proven = best_codes(t, R, -2, 1, np.full(5, 1.0), node_limit=10**6)
        assert proven and abs(val - brute) < 1e-9


def test_pruning_optimum_is_the_best_refit_over_supports():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 8, generator=g, dtype=torch.float64)
    H = 2 * X.T @ X / 64
    W = torch.randn(3, 8, generator=g, dtype=torch.float64)
    supports = nm_supports(8, 2, 4)
    assert len(supports) == 36
    opt = prune_optimum(W, H, supports)
    for r in range(3):
        errs = []
        for P in supports:
            S = [j for j in range(8) if j not in P]
            v = torch.zeros(8, dtype=torch.float64)
            v[S] = torch.linalg.solve(H[S][:, S], (H @ W[r])[S])
            errs.append(float(0.5 * (W[r] - v) @ H @ (W[r] - v)))
        assert abs(opt[r] - min(errs)) < 1e-10
