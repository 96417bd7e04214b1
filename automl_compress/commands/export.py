"""``automl-compress export RUN``: write a run's compressed model and check that it reloads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from automl_compress import pipeline
from automl_compress.commands import rundir
from automl_compress.errors import ConfigError
from automl_compress.roundtrip import EXPORT_FORMATS, export_plan

DEFAULT_FILES = {"packed": "compressed.safetensors", "state_dict": "state_dict.pt"}


def _packed_summary(path: Path, sizes: dict[str, int], run_dir: Path) -> str:
    summary = (
        f"exported {path} ({sizes['file_bytes']} bytes = header {sizes['header_bytes']} + "
        f"payload {sizes['payload_bytes']}; packed weights {sizes['packed_weight_bytes']})"
    )
    res_path = run_dir / "results.json"
    if res_path.is_file():
        counted = float(json.loads(res_path.read_text())["size_bytes"])
        summary += (f"; results.json size_bytes {counted:.0f}, payload / size_bytes "
                    f"{sizes['payload_bytes'] / counted:.3f}")
    return summary


def run(run_dir: str | Path, fmt: str = "packed", out: str | Path | None = None) -> int:
    """Export the run's plan and print the file's size.

    Also prints whether the reloaded model's outputs are identical.

    ``packed`` writes ``RUN/compressed.safetensors`` (packed integers, docs/export.md) and prints
    its size beside results.json's ``size_bytes``; ``state_dict`` writes ``RUN/state_dict.pt``, the
    dequantised float state dict of the user's own module classes.

    Args:
        run_dir: a run directory (config.yaml and plan.json).
        fmt: one of :data:`automl_compress.roundtrip.EXPORT_FORMATS`.
        out: the file to write (default: in the run directory).

    Returns:
        0 when the reloaded outputs are identical, 1 when they differ.

    Raises:
        ConfigError: an unknown format.
        CorruptCacheError: ``run_dir`` is not a run directory.
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"export format must be one of {EXPORT_FORMATS}, found {fmt!r}")
    run_dir = Path(run_dir)
    cfg, plan = rundir.load_run(run_dir)
    prepared = pipeline.prepare(cfg, run_dir)
    path = Path(out) if out is not None else run_dir / DEFAULT_FILES[fmt]
    sizes, same = export_plan(prepared, plan, fmt, path)
    if fmt == "state_dict":
        summary = (f"exported {path} ({sizes['file_bytes']} bytes, float state dict of the "
                   "model's own classes)")
    else:
        summary = _packed_summary(path, sizes, run_dir)
    print(f"{summary}; reloaded outputs identical: {same}")
    if not same:
        print("automl-compress: error: the reloaded model's outputs differ", file=sys.stderr)
        return 1
    return 0
