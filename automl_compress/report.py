"""A static HTML report of one or more run directories (``automl-compress report``).

For the runs given (a run directory holds ``results.json``; a folder of run directories stands for
all of them), the report shows:

- per task, the metric-vs-avg-bits curve of every method found in the runs (``results.json``'s
  ``method``: rtn, uniform, dp, evo, spdy, rl, ...; one point per run, joined in order of avg
  bits), the held-out ``metric`` solid and, when runs carry it, the validation ``metric_val``
  dashed, with the dense model's metric as a horizontal line;
- per run, the per-layer allocation: each layer's rows split by bit-width (the share of rows at
  each width, removed rows at 0 bits), the layer's sparsity pattern under its name and its
  weight sparsity;
- a table of the numbers (budget, avg bits, size, compression, metric, metric_val, evaluations,
  proxy error, wall time).

Plots are PNGs drawn with matplotlib's Agg canvas (no display, no pyplot state) and embedded in
the HTML as data URIs, so the one file reads offline. :func:`report_figures` gives the same
figures as RGB arrays for TensorBoard (:func:`automl_compress.logs.log_report`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from automl_compress.errors import CorruptCacheError, InvalidInputError
from automl_compress.io import atomic_write_text

__all__ = ["Run", "build_report", "find_runs", "report_figures", "write_report"]

# one colour per bit-width (0 = removed), light to dark, so a row's width reads as intensity
BIT_COLOURS = {0: "#d9d9d9", 1: "#fde0c5", 2: "#f9b384", 3: "#f08a5d", 4: "#c95b5b",
               5: "#a2406e", 6: "#6d2f7b", 7: "#40357f", 8: "#1b3a6b"}
# a method keeps its colour in every report; methods not listed take the spare ones in turn
METHOD_COLOURS = {"dp": "#1f77b4", "rtn": "#d62728", "uniform": "#2ca02c", "rl": "#9467bd",
                  "evo": "#ff7f0e", "spdy": "#8c564b", "haq": "#e377c2"}
SPARE_COLOURS = ["#17becf", "#7f7f7f", "#bcbd22", "#393b79", "#637939", "#843c39"]
MAX_FIG_WIDTH = 18.0


@dataclass(frozen=True)
class Run:
    """One run directory, read.

    Attributes:
        path: the run directory.
        label: a short unique name for the report (the directory name, or more of the path
            where directory names repeat).
        task: the task it compressed (``task.name`` of its config.yaml, ``?`` without one).
        results: results.json.
        patterns: layer name → sparsity pattern, from plan.json (empty without one).
    """

    path: Path
    label: str
    task: str
    results: dict[str, Any]
    patterns: dict[str, str]

    @property
    def method(self) -> str:
        """The method the run used (``?`` when results.json does not say)."""
        return str(self.results.get("method", "?"))

    @property
    def evaluations(self) -> int | None:
        """True-metric evaluations the method spent, None when the run does not say.

        Read from ``evaluations``, or the RL runs' ``metric_evaluations``.
        """
        for key in ("evaluations", "metric_evaluations"):
            v = self.results.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return int(v)
        return None


def _read_run(path: Path) -> tuple[str, dict[str, Any], dict[str, str]]:
    try:
        results = json.loads((path / "results.json").read_text())
    except (OSError, ValueError) as exc:
        raise CorruptCacheError(
            f"cannot read {str(path / 'results.json')!r} ({exc}); expected the results.json "
            "written by `automl-compress compress`, `train` or `apply`"
        ) from None
    missing = [k for k in ("method", "metric", "avg_bits", "layers") if k not in results]
    if missing:
        raise CorruptCacheError(
            f"{str(path / 'results.json')!r} lacks the keys {missing}; expected a results.json "
            "written by automl-compress"
        )
    task = "?"
    cfg_path = path / "config.yaml"
    if cfg_path.is_file():
        try:
            cfg = yaml.safe_load(cfg_path.read_text()) or {}
            task = str((cfg.get("task") or {}).get("name", "?"))
        except yaml.YAMLError:
            pass
    patterns: dict[str, str] = {}
    plan_path = path / "plan.json"
    if plan_path.is_file():
        try:
            layers = json.loads(plan_path.read_text()).get("layers", {})
            patterns = {n: str(v.get("pattern", "?")) for n, v in layers.items()}
        except (OSError, ValueError, AttributeError):
            patterns = {}
    return task, results, patterns


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """The run directories named by ``paths``, read.

    A path with a ``results.json`` is one run; a folder without one stands for every direct
    subfolder that has one (e.g. a sweep's output folder).

    Raises:
        InvalidInputError: a path that is neither a run directory nor holds any.
        CorruptCacheError: an unreadable results.json.
    """
    dirs: list[Path] = []
    for p in paths:
        p = Path(p)
        if (p / "results.json").is_file():
            dirs.append(p)
            continue
        subs = sorted(d for d in p.iterdir() if (d / "results.json").is_file()) \
            if p.is_dir() else []
        if not subs:
            raise InvalidInputError(
                f"{str(p)!r} is not a run directory (no results.json) and holds none; pass run "
                "directories written by `automl-compress compress`, `train` or `apply`, or a "
                "folder of them"
            )
        dirs.extend(subs)
    labels = _labels(dirs)
    runs = []
    for d, label in zip(dirs, labels, strict=True):
        task, results, patterns = _read_run(d)
        runs.append(Run(d, label, task, results, patterns))
    return runs


def _labels(dirs: Sequence[Path]) -> list[str]:
    """The shortest path tails that tell the directories apart."""
    parts = [d.resolve().parts for d in dirs]
    for k in range(1, max((len(p) for p in parts), default=1) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(d) for d in dirs]


# ---------------------------------------------------------------------------------------------
# Figures


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(min(width, MAX_FIG_WIDTH), height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def figure_rgb(fig) -> np.ndarray:
    """The figure as an (H, W, 3) uint8 RGB array."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def curve_figure(runs: Sequence[Run], task: str):
    """Metric vs avg bits of every method among ``runs`` (all of one task), dense line."""
    fig = _figure(7.5, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    methods = sorted({r.method for r in runs})
    has_val = False
    for i, method in enumerate(methods):
        pts = sorted((r for r in runs if r.method == method),
                     key=lambda r: float(r.results["avg_bits"]))
        colour = METHOD_COLOURS.get(method) or SPARE_COLOURS[
            sum(m not in METHOD_COLOURS for m in methods[:i]) % len(SPARE_COLOURS)]
        x = [float(r.results["avg_bits"]) for r in pts]
        ax.plot(x, [float(r.results["metric"]) for r in pts], marker="o", color=colour,
                label=method)
        val = [(float(r.results["avg_bits"]), float(r.results["metric_val"])) for r in pts
               if _finite(r.results.get("metric_val"))]
        if val:
            has_val = True
            ax.plot(*zip(*val, strict=True), marker="x", linestyle="--", color=colour,
                    label=f"{method} (validation)")
    dense = sorted({float(r.results["metric_dense"]) for r in runs
                    if _finite(r.results.get("metric_dense"))})
    for j, d in enumerate(dense):
        ax.axhline(d, color="black", linestyle=":", linewidth=1.2,
                   label="dense" if j == 0 else None)
    name = runs[0].results.get("metric_name", "metric")
    ax.set_xlabel("average bits per weight (metadata included)")
    ax.set_ylabel(f"{name} (held-out)" + (", validation dashed" if has_val else ""))
    ax.set_title(f"{task}: {name} vs average bits", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def allocation_figure(run: Run):
    """Per-layer share of rows at each bit-width (stacked), pattern and sparsity per layer."""
    layers = run.results["layers"]
    n = len(layers)
    fig = _figure(max(5.2, 0.42 * n + 2.5), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    widths = sorted({int(b) for lay in layers for b in lay.get("bits_histogram", {})})
    x = np.arange(n)
    bottom = np.zeros(n)
    for b in widths:
        share = np.array([lay["bits_histogram"].get(str(b), 0) / max(lay["rows"], 1)
                          for lay in layers], dtype=float)
        label = "removed (0 bits)" if b == 0 else f"{b} bits"
        ax.bar(x, share, bottom=bottom, color=BIT_COLOURS.get(b, "#444444"), label=label,
               edgecolor="white", linewidth=0.3)
        bottom += share
    sparsity = [float(lay.get("sparsity", 0.0)) for lay in layers]
    ax.plot(x, sparsity, color="black", marker=".", linewidth=1, label="weight sparsity")
    ax.set_xticks(x)
    ax.set_xticklabels(
        [f"{lay['name']} [{run.patterns.get(lay['name'], '?')}]" for lay in layers],
        rotation=60 if n > 8 else 30, ha="right", rotation_mode="anchor",
        fontsize=7 if n > 12 else 8)
    ax.set_ylim(0, 1.0)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylabel("share of the layer's rows")
    res = run.results
    ax.set_title(
        f"{run.label}: {run.method}, {float(res['avg_bits']):.3f} avg bits, "
        f"{res.get('metric_name', 'metric')} {float(res['metric']):.4f}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def _tasks(runs: Sequence[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for r in runs:
        out.setdefault(f"{r.task} ({r.results.get('metric_name', 'metric')})", []).append(r)
    return out


def report_figures(runs: Sequence[Run]) -> dict[str, Any]:
    """Every figure of the report, keyed ``curve/<task>`` and ``allocation/<run label>``.

    They are matplotlib Figures; :func:`figure_png` / :func:`figure_rgb` render them.
    """
    figs: dict[str, Any] = {}
    for task, group in _tasks(runs).items():
        figs[f"curve/{task}"] = curve_figure(group, group[0].task)
    for r in runs:
        figs[f"allocation/{r.label}"] = allocation_figure(r)
    return figs


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1500px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f2f2f2; } td.l, th.l { text-align: left; }
img { max-width: 100%; height: auto; border: 1px solid #eee; margin: 6px 0; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.grid figure { margin: 0; }
figcaption { font-size: 13px; font-weight: bold; }
p.note { color: #555; font-size: 13px; }
"""


def _fmt(v: Any, spec: str) -> str:
    return format(float(v), spec) if _finite(v) else "–"


def _table(runs: Sequence[Run]) -> str:
    has_val = any(_finite(r.results.get("metric_val")) for r in runs)
    has_evals = any(r.evaluations is not None for r in runs)
    head = ["run", "task", "method", "budget bits", "avg bits", "size bytes", "× smaller",
            "metric", "dense"]
    head += ["metric_val"] if has_val else []
    head += ["evaluations"] if has_evals else []
    head += ["proxy error", "wall s"]
    left = {"run", "task", "method"}
    rows = ["<tr>" + "".join(f'<th class="{"l" if h in left else ""}">{html.escape(h)}</th>'
                             for h in head) + "</tr>"]
    for r in sorted(runs, key=lambda r: (r.task, r.method, float(r.results["avg_bits"]))):
        res = r.results
        cells = [(r.label, "l"), (r.task, "l"), (r.method, "l"),
                 (_fmt(res.get("budget_bits"), "g"), ""), (_fmt(res["avg_bits"], ".3f"), ""),
                 (_fmt(res.get("size_bytes"), ",.0f"), ""),
                 (_fmt(res.get("compression_ratio"), ".2f"), ""),
                 (_fmt(res["metric"], ".4f"), ""), (_fmt(res.get("metric_dense"), ".4f"), "")]
        if has_val:
            cells.append((_fmt(res.get("metric_val"), ".4f"), ""))
        if has_evals:
            cells.append((str(r.evaluations) if r.evaluations is not None else "–", ""))
        cells += [(_fmt(res.get("proxy_error"), ".4g"), ""),
                  (_fmt(res.get("wall_seconds"), ".1f"), "")]
        rows.append("<tr>" + "".join(f'<td class="{c}">{html.escape(v)}</td>' for v, c in cells)
                    + "</tr>")
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def _img(fig, alt: str) -> str:
    data = base64.b64encode(figure_png(fig)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _describe_paths(runs: Sequence[Run]) -> str:
    paths = [r.path.resolve() for r in runs]
    parents = {p.parent for p in paths}
    if len(parents) == 1:
        names = ", ".join(html.escape(p.name) for p in paths)
        return f"{len(runs)} run(s) in {html.escape(str(parents.pop()))}: {names}"
    return f"{len(runs)} run(s): " + ", ".join(html.escape(str(p)) for p in paths)


def build_report(runs: Sequence[Run], title: str = "automl-compress report") -> str:
    """The report as one self-contained HTML page (PNG plots embedded)."""
    if not runs:
        raise InvalidInputError("build_report needs at least one run, found none")
    figs = report_figures(runs)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{_describe_paths(runs)}</p>',
        "<h2>Metric vs average bits</h2>",
        '<p class="note">One point per run, one line per method (results.json <code>method'
        "</code>), held-out metric solid, validation metric dashed where runs carry it; the "
        "dotted line is the dense model.</p>",
    ]
    for key, fig in figs.items():
        if key.startswith("curve/"):
            parts.append(_img(fig, key))
    parts += ["<h2>Numbers</h2>", _table(runs), "<h2>Per-layer allocation</h2>",
              '<p class="note">Each bar: one layer, its rows split by bit-width (grey: removed '
              "output channels); the layer's sparsity pattern in brackets; the line is the share "
              "of the layer's weights that are zero by pruning (removed rows and sparsity).</p>"]
    parts.append('<div class="grid">')
    for r in runs:
        parts.append(f"<figure><figcaption>{html.escape(r.label)}</figcaption>"
                     + _img(figs[f"allocation/{r.label}"], f"allocation {r.label}")
                     + "</figure>")
    parts.append("</div></body></html>")
    return "\n".join(parts) + "\n"


def write_report(paths: Iterable[str | Path], out: str | Path,
                 title: str = "automl-compress report") -> list[Run]:
    """Read the runs, write the HTML report to ``out`` (atomically), return the runs."""
    runs = find_runs(paths)
    atomic_write_text(out, build_report(runs, title))
    return runs
