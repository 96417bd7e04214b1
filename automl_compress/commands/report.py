"""``automl-compress report``: an HTML report of run directories (automl_compress/report.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from automl_compress.report import write_report


def run(runs: Sequence[str | Path], out: str | Path, title: str,
        tb: str | Path | None = None) -> int:
    """Write the report of ``runs`` to ``out`` and print what was written.

    Its figures also go as TensorBoard images under ``tb/report``, and its metric-vs-bits curves
    as scalars there (``curve/<task>/<split>/<method>``, x = milli-bits).

    Args:
        runs: run directories (a folder of run directories stands for all of them).
        out: the HTML file.
        title: the page's title.
        tb: a TensorBoard folder, or None.

    Returns:
        0 on success.

    Raises:
        InvalidInputError: a path holds no run directory.
    """
    found = write_report(runs, out, title)
    methods = sorted({r.method for r in found})
    print(f"report of {len(found)} run(s), methods {', '.join(methods)} -> {out}")
    if tb:
        from automl_compress.logs import write_report_images

        tags = write_report_images(tb, found)
        curves = sum(t.startswith("curve/") for t in tags)
        print(f"{len(tags) - curves} TensorBoard images and {curves} curves -> "
              f"{Path(tb) / 'report'}")
    return 0
