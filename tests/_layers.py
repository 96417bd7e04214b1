"""Synthetic layers shared by the solver and database tests (one helper module)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layer:
    W: torch.Tensor
    X: torch.Tensor
    H: torch.Tensor

    def direct_row_error(self, W_hat: torch.Tensor) -> torch.Tensor:
        """‖(w − ŵ)Xᵀ‖² / n per row, straight from the calibration inputs."""
        D = (self.W - W_hat).to(torch.float64)
        return ((D @ self.X.T) ** 2).sum(1) / self.X.shape[0]


def make_layer(rows: int, cols: int, seed: int = 0, n: int | None = None) -> Layer:
    """W ~ N(0, 1/cols); X = Z·A with A = diag(s)Qᵀ, s_i² = 1/(i+1); H = 2XᵀX/n."""
    g = torch.Generator().manual_seed(seed)
    n = n or max(4 * cols, 512)
    Q, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    s = 1.0 / torch.sqrt(torch.arange(1, cols + 1, dtype=torch.float64))
    X = torch.randn(n, cols, generator=g, dtype=torch.float64) @ (torch.diag(s) @ Q.T)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64) / cols**0.5
    return Layer(W=W, X=X, H=2 * X.T @ X / n)


def mixed_layer(rows: int, cols: int, n: int, seed: int = 0, mix: float = 0.7,
                generator: torch.Generator | None = None):
    """W ~ N(0, 1); X = Z·A with A = I + mix·G/√cols; returns (W, X, H = 2XᵀX/n).

    ``generator``: draw from this one (it is left advanced, for the caller's further draws)
    instead of a fresh one seeded with ``seed``.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    A = torch.eye(cols, dtype=torch.float64)
    A = A + mix * torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols**0.5
    X = torch.randn(n, cols, generator=g, dtype=torch.float64) @ A
    return W, X, 2 * X.T @ X / n


def gaussian_layer(rows: int, cols: int, n: int, seed: int = 0):
    """W ~ N(0, 1/cols); X = Z·G with G ~ N(0, 1) (strongly correlated inputs); returns
    (W, X, H = 2XᵀX/n)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64) / cols**0.5
    A = torch.randn(cols, cols, generator=g, dtype=torch.float64)
    X = torch.randn(n, cols, generator=g, dtype=torch.float64) @ A
    return W, X, 2 * X.T @ X / n
