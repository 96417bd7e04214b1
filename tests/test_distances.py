"""Output distances: zero at the dense outputs, probes whose covariance is the curvature."""

from __future__ import annotations

import pytest
import torch

from automl_compress.distances import DistanceName, get_distance, output_tensor
from automl_compress.errors import InvalidInputError


@pytest.mark.parametrize("name", [d.value for d in DistanceName])
def test_zero_at_reference_and_positive_elsewhere(name):
    dist = get_distance(name)
    y0 = torch.randn(5, 7, dtype=torch.float64)
    assert torch.allclose(dist.value(y0, y0), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert (dist.value(y0 + 0.3 * torch.randn_like(y0), y0) > 0).all()
    fid = dist.fidelity(y0, y0)
    assert torch.allclose(fid, torch.full_like(fid, 1.0 if name == "cosine" else 0.0))


@pytest.mark.parametrize("name", [d.value for d in DistanceName])
def test_probe_covariance_is_the_hessian(name):
    """E[v vᵀ] over many probes equals the Hessian of D at y = y0 (autograd), per item."""
    dist = get_distance(name)
    torch.manual_seed(0)
    y0 = torch.randn(1, 4, dtype=torch.float64)

    def d(y):
        return dist.value(y.reshape(1, 4), y0).sum()

    H = torch.autograd.functional.hessian(d, y0.reshape(4).clone())
    gen = torch.Generator().manual_seed(1)
    n = 40_000
    v = dist.probe(y0.expand(n, 4).contiguous(), gen)
    cov = v.T @ v / n
    assert torch.allclose(cov, H, atol=0.03 * float(H.abs().max()) + 1e-9)


def test_unknown_distance_and_non_tensor_output_are_named():
    with pytest.raises(InvalidInputError, match="unknown output distance 'l1'"):
        get_distance("l1")
    with pytest.raises(InvalidInputError, match="found dict"):
        output_tensor({"logits": torch.zeros(2, 3)}, "task 'x'")
    with pytest.raises(InvalidInputError, match="torch.int64"):
        output_tensor(torch.zeros(2, dtype=torch.int64), "task 'x'")
