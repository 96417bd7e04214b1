"""The library behind ``export``: write a plan's compressed model and check that it reloads.

:func:`export_plan` writes the stitched, corrected model of a plan either as packed integers
(automl_compress/export.py, docs/export.md) or as a float state dict of the model's own classes,
loads the file back and compares the two models' outputs on a calibration batch.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from automl_compress.errors import ConfigError
from automl_compress.pipeline import Prepared, stitched_model
from automl_compress.plan import CompressionPlan

EXPORT_FORMATS = ("packed", "state_dict")


def export_plan(prepared: Prepared, plan: CompressionPlan, fmt: str,
                path: str | Path) -> tuple[dict[str, Any], bool]:
    """Write the plan's compressed model to ``path`` and check that it reloads.

    Args:
        prepared: the task and the database the plan was made from.
        plan: the plan.
        fmt: 'packed' (packed integers + plan in one safetensors file, docs/export.md) or
            'state_dict' (the dequantised float state dict of the model's own classes).
        path: the file to write.

    Returns:
        The sizes ('packed': :func:`~automl_compress.export.export_compressed`'s, in bytes;
        'state_dict': ``file_bytes``) and whether the reloaded model's outputs on the first
        calibration batch match the stitched model's.

    Raises:
        ConfigError: an unknown format.
    """
    from automl_compress.attention import fuse_attention
    from automl_compress.export import export_compressed, export_state_dict, load_compressed

    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"export format must be one of {EXPORT_FORMATS}, found {fmt!r}")
    model = stitched_model(prepared, plan)
    if fmt == "state_dict":
        sizes = {"file_bytes": int(export_state_dict(path, model))}
        reloaded = copy.deepcopy(fuse_attention(prepared.task.model))
        reloaded.load_state_dict(torch.load(path, weights_only=True))
        reloaded.eval()
    else:
        sizes = export_compressed(path, model, prepared.db, plan, cost=prepared.cfg.cost)
        reloaded = load_compressed(path, prepared.task)
    batch = prepared.task.calib[0]
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the same attention kernels on both sides
    try:
        with torch.no_grad():
            a = prepared.task.forward(model, batch)
            b = prepared.task.forward(reloaded, batch)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return sizes, same_outputs(a, b)


def same_outputs(a: Any, b: Any) -> bool:
    """Whether two model outputs agree.

    Tensors to rtol 1e-5 / atol 1e-6; mappings, tuples and lists element by element; anything else
    by equality.
    """
    if isinstance(a, torch.Tensor):
        return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6))
    if isinstance(a, Mapping):
        return all(same_outputs(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return all(same_outputs(x, y) for x, y in zip(a, b, strict=True))
    return a == b
