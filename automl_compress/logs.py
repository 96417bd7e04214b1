"""TensorBoard helpers for the search (``RUN/tb/``, docs/architecture.md "Run directory").

The ``search`` run holds the episode scalars (``episode/reward``, ``episode/metric``,
``episode/avg_bits``, ``episode/proxy_error``, ``episode/projections``, ``search/best_metric``),
the image ``episode/allocation`` (per-layer mean bit-width and pruned share, drawn with
matplotlib's Agg canvas, no pyplot state), and the texts ``config`` and ``plan/best``. The SB3
controllers log their own ``train/*`` and ``rollout/*`` into sibling runs (see
:func:`sb3_logger`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from automl_compress.database.tables import LayerTable
from automl_compress.plan import CompressionPlan

SEARCH_RUN = "search"


def sb3_logger(tb_dir: str | Path | None, run: str):
    """An SB3 logger writing TensorBoard events into ``tb_dir/run`` (e.g. 'layer_controller').

    With ``tb_dir`` None, a logger that writes nothing: a model without a logger of its own gets
    a fresh empty ``SB3-<time>`` folder in the system's temp directory from every ``learn`` call.
    """
    from stable_baselines3.common.logger import Logger, configure

    if tb_dir is None:
        return Logger(folder=None, output_formats=[])
    return configure(str(Path(tb_dir) / run), ["tensorboard"])


def allocation_image(plan: CompressionPlan, tables: Sequence[LayerTable], title: str = "") \
        -> np.ndarray:
    """Per-layer mean bit-width of the kept rows (bars) and pruned row share (line) as an image.

    Returns:
        (H, W, 3) uint8 RGB array.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names, mean_bits, pruned = [], [], []
    for t in tables:
        rb = np.asarray(plan.layers[t.info.name].row_bits)
        kept = rb[rb > 0]
        names.append(f"{t.info.name}\n{plan.layers[t.info.name].pattern}")
        mean_bits.append(float(kept.mean()) if len(kept) else 0.0)
        pruned.append(float((rb == 0).mean()))
    fig = Figure(figsize=(max(4.0, 0.6 * len(tables) + 2.0), 3.2), dpi=80)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(tables))
    ax.bar(x, mean_bits, color="#4c72b0", label="mean bits (kept rows)")
    ax.set_ylabel("bits")
    ax.set_ylim(0, 8.5)
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize=6, rotation=45, ha="right")
    ax2 = ax.twinx()
    ax2.plot(x, pruned, color="#dd8452", marker="o", label="pruned share")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("pruned share")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_curve(writer, task: str, points: Mapping[str, Sequence[tuple[float, float]]],
              split: str = "test") -> list[str]:
    """The metric-vs-budget curve of every method as TensorBoard scalars.

    TensorBoard's x axis is an integer step, so a point at b average bits is logged at step
    ``round(1000 · b)`` (milli-bits); TensorBoard then draws each method's metric against the
    budget, the methods of one task overlaid under ``curve/<task>/<split>/``.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter``.
        task: the task's name (one curve group per task).
        points: method → (average bits, metric) points.
        split: which split the metric is on ('test' or 'validation').

    Returns:
        The scalar tags written (``curve/<task>/<split>/<method>``).
    """
    tags = []
    for method, pts in sorted(points.items()):
        tag = f"curve/{task}/{split}/{method}"
        for bits, value in sorted(pts):
            writer.add_scalar(tag, float(value), int(round(1000 * float(bits))))
        tags.append(tag)
    return tags


def log_report(writer, runs: Sequence, step: int = 0) -> list[str]:
    """Add the report's figures as images and its metric-vs-bits curves as scalars.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter``.
        runs: :class:`automl_compress.report.Run` records (``report.find_runs``).
        step: the global step of the images.

    Returns:
        The tags written: images ``report/curve/<task>`` and ``report/allocation/<run>``, and
        the curves as scalars (:func:`log_curve`).
    """
    from automl_compress.report import figure_rgb, report_figures

    tags = []
    for key, fig in report_figures(runs).items():
        tag = f"report/{key}"
        writer.add_image(tag, figure_rgb(fig), step, dataformats="HWC")
        tags.append(tag)
    for task in sorted({r.task for r in runs}):
        mine = [r for r in runs if r.task == task and "avg_bits" in r.results]
        for split, key in (("test", "metric"), ("validation", "metric_val")):
            points: dict[str, list[tuple[float, float]]] = {}
            for r in mine:
                value = r.results.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    points.setdefault(r.method, []).append((r.results["avg_bits"], value))
            tags += log_curve(writer, task, points, split)
    writer.flush()
    return tags


def write_report_images(tb_dir: str | Path, runs: Sequence, step: int = 0) -> list[str]:
    """:func:`log_report` into the TensorBoard run ``tb_dir/report``; returns the tags."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(Path(tb_dir) / "report"))
    try:
        return log_report(writer, runs, step)
    finally:
        writer.close()


def plan_table(plan: CompressionPlan, tables: Sequence[LayerTable]) -> str:
    """A markdown table of a plan: layer, pattern, bit histogram, pruned share, error."""
    lines = ["| layer | pattern | rows | bits histogram | pruned | error |",
             "|---|---|---|---|---|---|"]
    for t in tables:
        lp = plan.layers[t.info.name]
        vals, counts = np.unique(np.asarray(lp.row_bits), return_counts=True)
        hist = ", ".join(f"{v}b×{c}" for v, c in zip(vals, counts, strict=True))
        err = t.error_of(lp.pattern, np.asarray(lp.row_bits))
        pruned = float((np.asarray(lp.row_bits) == 0).mean())
        lines.append(f"| {t.info.name} | {lp.pattern} | {t.info.rows} | {hist} | {pruned:.2f} | "
                     f"{err:.4g} |")
    return "\n".join(lines)


class SearchWriter:
    """The ``search`` TensorBoard run.

    Args:
        tb_dir: the run's ``tb`` folder; events go to ``tb_dir/search``.
        purge_step: on resume, the global step to continue from (later events are dropped).
    """

    def __init__(self, tb_dir: str | Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(tb_dir) / SEARCH_RUN), purge_step=purge_step)

    def config(self, text: str) -> None:
        """The resolved config as text (shown verbatim)."""
        self.writer.add_text("config", "```\n" + text + "\n```", 0)

    def episode(self, step: int, reward: float, metric: float, avg_bits: float,
                proxy_error: float, projections: int) -> None:
        """One episode's scalars; ``metric`` is skipped when it was not measured (nan)."""
        w = self.writer
        w.add_scalar("episode/reward", reward, step)
        if math.isfinite(metric):
            w.add_scalar("episode/metric", metric, step)
        w.add_scalar("episode/avg_bits", avg_bits, step)
        w.add_scalar("episode/proxy_error", proxy_error, step)
        w.add_scalar("episode/projections", projections, step)

    def moves(self, step: int, name: str, moves: float) -> None:
        """Controller ``name``'s expected moves an episode (``Search.expected_moves``)."""
        self.writer.add_scalar(f"controllers/{name}/expected_moves", moves, step)

    def best(self, step: int, metric: float) -> None:
        """The best metric so far, at ``step``."""
        self.writer.add_scalar("search/best_metric", metric, step)

    def allocation(self, step: int, plan: CompressionPlan, tables: Sequence[LayerTable],
                   title: str) -> None:
        """The plan's allocation image, titled ``title``, at ``step``."""
        img = allocation_image(plan, tables, title)
        self.writer.add_image("episode/allocation", img, step, dataformats="HWC")

    def best_plan(self, step: int, plan: CompressionPlan, tables: Sequence[LayerTable]) -> None:
        """The best plan as a text table, at ``step``."""
        self.writer.add_text("plan/best", plan_table(plan, tables), step)

    def flush(self) -> None:
        """Write the pending events to disk."""
        self.writer.flush()

    def close(self) -> None:
        """Close the writer."""
        self.writer.close()
