"""Apply a :class:`CompressionPlan` to a copy of a model, row by row from the layer database.

Layers were solved independently from dense-model inputs (docs/solvers.md §1), so any per-row
mixture of stored options can be stitched: row r of layer l takes the stored solution of
(pattern_l, bits_lr); a 0-bit row is all zeros. The user's model is never modified (a deep copy is
returned), and the error of a stitched layer is exactly the sum of its table entries.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from automl_compress.database.store import LayerDatabase, LayerSolutions
from automl_compress.errors import InvalidInputError, ShapeMismatchError
from automl_compress.plan import CompressionPlan, LayerPlan

SOURCES = ("table", "rtn")


def plan_source(plan: CompressionPlan) -> str:
    """Which stored solutions a plan refers to: 'rtn' for the rtn baseline, else 'table'."""
    return "rtn" if plan.meta.get("method") == "rtn" else "table"


def layer_weight(sol: LayerSolutions, lp: LayerPlan, source: str = "table") -> torch.Tensor:
    """The (rows, cols) float32 weight of one layer under a layer plan.

    Args:
        sol: the layer's stored solutions.
        lp: pattern and per-row bits.
        source: 'table' (the configured solvers) or 'rtn' (round-to-nearest, dense only).

    Raises:
        InvalidInputError: wrong row count, a bit-width or pattern the database lacks.
    """
    info = sol.info
    if source not in SOURCES:
        raise InvalidInputError(f"source must be one of {SOURCES}, found {source!r}")
    if len(lp.row_bits) != info.rows:
        raise InvalidInputError(
            f"plan for {info.name!r} has {len(lp.row_bits)} row bit-widths, the layer has "
            f"{info.rows} rows"
        )
    if lp.pattern not in sol.table.patterns or (source == "rtn" and lp.pattern != "dense"):
        allowed = ["dense"] if source == "rtn" else list(sol.table.patterns)
        raise InvalidInputError(
            f"pattern {lp.pattern!r} is not stored for {info.name!r}; expected one of {allowed}"
        )
    rb = torch.tensor(lp.row_bits, dtype=torch.int64)
    W = torch.zeros(info.rows, info.cols, dtype=torch.float32)
    for b in sorted(set(lp.row_bits)):
        if b == 0:
            continue
        if b not in sol.table.bits:
            raise InvalidInputError(
                f"bit-width {b} is not in the database menu {list(sol.table.bits)} for "
                f"{info.name!r}"
            )
        opt = sol.rtn[b] if source == "rtn" else sol.options[(lp.pattern, b)]
        rows = torch.nonzero(rb == b).flatten()
        W[rows] = opt.weight(sol.blocks, rows)
    return W


def set_weight(module: nn.Module, W: torch.Tensor) -> None:
    """Replace a layer's weight values (shape restored from ``(rows, cols)``)."""
    w = module.weight
    if W.numel() != w.numel():
        raise ShapeMismatchError(
            f"stitched weight has {W.numel()} values, the module's weight {tuple(w.shape)} has "
            f"{w.numel()}"
        )
    with torch.no_grad():
        w.copy_(W.reshape(w.shape).to(dtype=w.dtype, device=w.device))


def stitch(
    model: nn.Module,
    db: LayerDatabase | Mapping[str, LayerSolutions],
    plan: CompressionPlan,
    source: str | None = None,
) -> nn.Module:
    """A compressed deep copy of ``model`` (the original is untouched).

    Args:
        model: the dense model.
        db: the layer database (or a name -> LayerSolutions mapping).
        plan: per-layer pattern and per-row bits; layers not in the plan stay dense.
        source: 'table' or 'rtn'; default from ``plan.meta['method']``.

    Returns:
        The stitched model, in eval mode.
    """
    source = source or plan_source(plan)
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    for name, lp in plan.layers.items():
        if name not in modules:
            raise InvalidInputError(
                f"plan names layer {name!r}, which the model does not have; expected module "
                "names such as " + ", ".join(list(modules)[1:6])
            )
        sol = db.layer(name) if isinstance(db, LayerDatabase) else db[name]
        set_weight(modules[name], layer_weight(sol, lp, source))
    return out.eval()
