"""The report: runs found, figures drawn, HTML offline and rendered by a real headless browser."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
import torch
from _compress_task import TinyNet, tiny_config

from automl_compress import pipeline
from automl_compress.cli import main
from automl_compress.commands import rundir
from automl_compress.errors import InvalidInputError
from automl_compress.plan import CompressionPlan
from automl_compress.report import build_report, find_runs, report_figures

TASK = "_compress_task:make_task"
BUDGETS = (3.0, 4.5, 6.0)
METHODS = ("uniform", "dp", "rtn")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """runs/<method>_<budget>/ for three methods at three budgets on the tiny task; the dp runs
    also carry a validation metric and an evaluation count, as later searches will."""
    root = tmp_path_factory.mktemp("runs")
    cfg = tiny_config(f"task.name={TASK}")
    prepared = pipeline.prepare(cfg, root, db_dir=root.parent / f"{root.name}_db",
                                progress=False)
    for method in METHODS:
        for budget in BUDGETS:
            plan = pipeline.allocate(prepared, method, budget)
            value = pipeline.evaluate_plan(prepared, plan)
            sel = {"metric_val": value - 0.01, "evaluations": 12} if method == "dp" else None
            rundir.write_run(root / f"{method}_{budget:g}", cfg, prepared, plan, method, value,
                             1.0, selection=sel)
    return root


def test_find_runs_reads_folders_and_rejects_others(sweep, tmp_path):
    runs = find_runs([sweep])
    assert len(runs) == len(METHODS) * len(BUDGETS)
    assert {r.method for r in runs} == set(METHODS)
    assert {r.task for r in runs} == {TASK}
    one = find_runs([sweep / "dp_3"])[0]
    assert one.label == "dp_3" and one.evaluations == 12
    assert set(one.patterns) == {lay["name"] for lay in one.results["layers"]}
    with pytest.raises(InvalidInputError, match="not a run directory"):
        find_runs([tmp_path])


def test_figures_show_every_method_and_layer(sweep):
    runs = find_runs([sweep])
    figs = report_figures(runs)
    curves = [k for k in figs if k.startswith("curve/")]
    assert len(curves) == 1
    ax = figs[curves[0]].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert set(labels) == {*METHODS, *(f"{m} (validation)" for m in METHODS), "dense"}
    for line in ax.get_lines():  # each method's points in order of avg bits
        if line.get_label() in METHODS:
            x = line.get_xdata()
            assert len(x) == len(BUDGETS) and list(x) == sorted(x)
    dense = [ln for ln in ax.get_lines() if ln.get_label() == "dense"][0]
    assert dense.get_ydata()[0] == pytest.approx(runs[0].results["metric_dense"])
    alloc = figs["allocation/dp_3"].axes[0]
    names = [t.get_text() for t in alloc.get_xticklabels()]
    assert names[0].startswith("conv1 [") and len(names) == 4
    # the stacked bars of a layer add up to all its rows
    heights = np.zeros(len(names))
    for bar in alloc.patches:
        heights[int(round(bar.get_x() + bar.get_width() / 2))] += bar.get_height()
    np.testing.assert_allclose(heights, 1.0)


def test_html_is_self_contained_and_lists_the_numbers(sweep, tmp_path):
    runs = find_runs([sweep])
    page = build_report(runs)
    assert "http://" not in page and "https://" not in page  # nothing to fetch: offline
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 1 + len(runs)
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    dp3 = next(r for r in runs if r.label == "dp_3")
    assert f"{dp3.results['metric']:.4f}" in page and f"{dp3.results['avg_bits']:.3f}" in page
    assert "metric_val" in page and ">12<" in page  # shown because runs carry them
    old = tmp_path / "old_run"  # a run written before validation splits and counted searches
    shutil.copytree(sweep / "rtn_3", old)
    res = json.loads((old / "results.json").read_text())
    for key in ("metric_val", "metric_dense_val", "evaluations"):
        res.pop(key, None)
    (old / "results.json").write_text(json.dumps(res))
    plain = build_report(find_runs([old]))
    assert "metric_val" not in plain and "evaluations" not in plain


def test_cli_report_and_tensorboard_images(sweep, tmp_path, capsys):
    out = tmp_path / "r.html"
    tb = tmp_path / "tb"
    assert main(["report", str(sweep / "dp_3"), str(sweep / "rtn_4.5"), "--out", str(out),
                 "--tb", str(tb)]) == 0
    assert "report of 2 run(s), methods dp, rtn" in capsys.readouterr().out
    assert out.read_text().count("data:image/png") == 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb / "report"))
    acc.Reload()
    assert sorted(acc.Tags()["images"]) == ["report/allocation/dp_3", "report/allocation/rtn_4.5",
                                            f"report/curve/{TASK} (top1)"]
    # the curves as scalars: one point per run at its average bits (step = milli-bits)
    for split, key in (("test", "metric"), ("validation", "metric_val")):
        for run in ("dp_3", "rtn_4.5"):
            res = json.loads((sweep / run / "results.json").read_text())
            (point,) = acc.Scalars(f"curve/{TASK}/{split}/{res['method']}")
            assert point.step == round(1000 * res["avg_bits"])
            assert point.value == pytest.approx(res[key])
    assert main(["report", str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_cli_export_state_dict_loads_into_a_fresh_model(sweep, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(sweep / "dp_3", run)
    shutil.copytree(sweep.parent / f"{sweep.name}_db", run / "db")
    assert main(["export", str(run), "--format", "state_dict"]) == 0
    assert "identical: True" in capsys.readouterr().out
    fresh = TinyNet(8)  # the user's own class, nothing of this package
    fresh.load_state_dict(torch.load(run / "state_dict.pt", weights_only=True))
    fresh.eval()
    prepared = pipeline.prepare(tiny_config(f"task.name={TASK}"), run, progress=False)
    model = pipeline.stitched_model(prepared, CompressionPlan.load(run / "plan.json"))
    x = torch.cat(list(prepared.task.calib))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    metric = json.loads((run / "results.json").read_text())["metric"]
    assert prepared.task.evaluate(fresh) == pytest.approx(metric)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(sweep, tmp_path):
    """The page renders in a real browser: the screenshot is not blank and holds the plots.

    The screenshot is kept in ``tmp_path/report.png`` for a human to look at."""
    page = tmp_path / "report.html"
    assert main(["report", str(sweep), "--out", str(page)]) == 0
    shot = tmp_path / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", f"--screenshot={shot}",
             "--window-size=1200,1600", "--hide-scrollbars", page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    from matplotlib.image import imread

    img = imread(shot)[..., :3]
    assert img.shape[:2] == (1600, 1200)
    assert img.std() > 0.05  # not a blank page
    # the plots' colours are on screen: the method lines (blue) and the dense line (black)
    blue = (np.abs(img - np.array([0x1F, 0x77, 0xB4]) / 255).sum(axis=2) < 0.1).sum()
    dark = (img.sum(axis=2) < 0.3).sum()
    assert blue > 200 and dark > 500
