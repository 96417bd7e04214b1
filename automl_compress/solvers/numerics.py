"""Working precision and row-batch sizing, shared by every solver (docs/solvers.md §5)."""

from __future__ import annotations

import numpy as np
import torch

#: Bytes of (cols, cols) matrices one CPU row batch may hold. Every greedy step costs ~20 small
#: tensor operations per batch, so larger batches spread that overhead over more rows; since the
#: compaction works in place (``lazy_inverse``), 64 MiB beat 24 MiB at 256–1024 columns under
#: either malloc setting (docs/solvers.md §9.1).
CPU_BATCH_BYTES = 64 * 2**20
#: Fewest rows per CPU batch: every greedy step costs ~20 small tensor operations per batch, so
#: tiny batches are bound by the per-operation overhead, whatever their memory ...
CPU_MIN_ROWS = 16
#: ... unless that would hold more than this many bytes (wide layers: 8192 columns are 256 MiB
#: per row in float32).
CPU_MAX_BATCH_BYTES = 1 << 30


def solve_dtype(W: torch.Tensor, dtype: torch.dtype | None = None) -> torch.dtype:
    """The working precision of a solve.

    ``dtype`` if given, else float64 for float64 weights and float32 otherwise (the Hessian is
    always prepared and inverted in float64, and errors are always evaluated in float64).
    """
    if dtype is not None:
        return dtype
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def auto_row_batch(
    rows: int, cols: int, dtype: torch.dtype, device: torch.device, copies: int = 1
) -> int:
    """How many rows one batch holds when each row needs ``copies`` (cols, cols) matrices.

    On CUDA half of the free device memory is used; on the CPU :data:`CPU_BATCH_BYTES`, but not
    fewer than :data:`CPU_MIN_ROWS` rows while they fit :data:`CPU_MAX_BATCH_BYTES`.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_row = max(1, copies * cols * cols * itemsize)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        fit = free // 2 // per_row
    else:
        fit = max(CPU_BATCH_BYTES // per_row, min(CPU_MIN_ROWS, CPU_MAX_BATCH_BYTES // per_row))
    return int(max(1, min(rows, fit)))


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(1)`` (first maximum of every row, NaN counting as the maximum), as int64.

    On the CPU numpy's vectorised argmax is used: for the (rows, cols) score matrices of the
    greedy solvers it is about 10× faster than torch's, and it is called once per greedy step.
    """
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.requires_grad:
        return x.argmax(1)
    return torch.from_numpy(x.numpy().argmax(1).astype(np.int64, copy=False))


def restricted(M: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``M[idx][:, idx]`` per row (n, m, m), identity on padded rows and columns.

    :param M: (cols, cols) matrix.
    :param idx: (n, m) column indices of every row, padded (any index) where ``valid`` is False.
    :param valid: (n, m) bool, the real slots.
    """
    n, m = idx.shape
    A = M.index_select(0, idx.reshape(-1)).view(n, m, M.shape[1])
    A = A.gather(2, idx[:, None, :].expand(n, m, m))
    if bool(valid.all()):
        return A
    vm = valid.to(M.dtype)
    A.mul_(vm[:, :, None]).mul_(vm[:, None, :])
    A.diagonal(dim1=1, dim2=2).add_(1.0 - vm)
    return A
