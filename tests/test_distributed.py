"""The Ray executor on a local Ray (``ray.init(num_cpus=2)``): the same database as the serial
build, a worker killed mid-build, a killed driver that resumes, and searches that give the same
result and the same evaluation counts as local scoring. Skipped when Ray is not installed (the
``distributed`` extra)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _compress_task import make_task, tiny_config

ray = pytest.importorskip("ray")

from automl_compress import pipeline, selection  # noqa: E402
from automl_compress.config import ExecutorConfig  # noqa: E402
from automl_compress.database.allocate import allocate_dp  # noqa: E402
from automl_compress.database.build import build_database  # noqa: E402
from automl_compress.database.solve import solve_unit  # noqa: E402
from automl_compress.distributed import RayExecutor, WorkerFailure  # noqa: E402
from automl_compress.errors import ExecutorError  # noqa: E402
from automl_compress.search import evo_search, spdy_search  # noqa: E402

TESTS = str(Path(__file__).resolve().parent)
RAY = ExecutorConfig(kind="ray", workers=2, max_retries=2)
BUDGET = 3.0


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module; its workers import the tests' task module."""
    path = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def task():
    return make_task()


@pytest.fixture(scope="module")
def serial(task, tmp_path_factory):
    return build_database(task, tiny_config(), tmp_path_factory.mktemp("serial"), progress=False)


def assert_same_database(a, b) -> None:
    assert [i.name for i in a.order] == [i.name for i in b.order]
    for info in a.order:
        x, y = a.layer(info.name), b.layer(info.name)
        np.testing.assert_array_equal(x.table.errors, y.table.errors)
        np.testing.assert_array_equal(np.asarray(x.rtn_errors), np.asarray(y.rtn_errors))
        assert x.options.keys() == y.options.keys()
        for key, opt in x.options.items():
            assert torch.equal(opt.codes, y.options[key].codes), (info.name, key)
            assert torch.equal(opt.scale, y.options[key].scale), (info.name, key)


def test_ray_build_gives_the_serial_tables(local_ray, task, serial, tmp_path):
    ex = RayExecutor(RAY)
    db = build_database(task, tiny_config(), tmp_path / "db", progress=False, executor=ex)
    assert db.complete and not ex.failures
    assert_same_database(db, serial)


def test_a_worker_killed_mid_build_is_retried_and_reported(local_ray, task, serial, tmp_path):
    marker = tmp_path / "killed"

    def dies_once(*args):
        try:  # exactly one task, of the two running at once, gets to create the marker
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return solve_unit(*args)
        os.close(fd)
        os._exit(1)  # that task's worker process dies in the middle of the build

    ex = RayExecutor(RAY, solve=dies_once)
    with pytest.warns(WorkerFailure, match="worker died"):
        db = build_database(task, tiny_config(), tmp_path / "db", progress=False, executor=ex)
    assert marker.exists() and len(ex.failures) == 1
    assert_same_database(db, serial)


def test_a_unit_whose_workers_keep_dying_names_the_layer(local_ray, task, tmp_path):
    def always_dies(*args):
        os._exit(1)

    ex = RayExecutor(dataclasses.replace(RAY, max_retries=1), solve=always_dies)
    with pytest.warns(WorkerFailure), pytest.raises(ExecutorError, match="re-run the same"):
        build_database(task, tiny_config(), tmp_path / "db", progress=False, executor=ex)


def test_gpu_tasks_on_a_cluster_without_gpus_name_the_resources(local_ray):
    ex = RayExecutor(dataclasses.replace(RAY, num_gpus=None))
    assert ex.num_gpus("cpu") == 0.0 and ex.num_gpus("auto") == 0.0 and ex.slots("cpu") == 2
    assert ex.num_gpus("cuda") == 1.0
    with pytest.raises(ExecutorError, match="has none"):
        ex.slots("cuda")


def test_a_killed_driver_resumes_with_the_layers_left(local_ray, task, serial, tmp_path):
    root, seen = tmp_path / "db", []

    def stop_after_two(name):
        seen.append(name)
        if len(seen) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        build_database(task, tiny_config(), root, progress=False, on_layer_done=stop_after_two,
                       executor=RayExecutor(RAY))
    manifest = json.loads((root / "manifest.json").read_text())
    assert not manifest["complete"] and sorted(manifest["layers"]) == sorted(seen)
    first = {n: (root / e["file"]).stat().st_mtime_ns for n, e in manifest["layers"].items()}
    resumed = []
    db = build_database(task, tiny_config(), root, progress=False, on_layer_done=resumed.append,
                        executor=RayExecutor(RAY))
    assert sorted(resumed) == sorted({"conv1", "conv2", "fc1", "fc2"} - set(seen))
    for n, e in json.loads((root / "manifest.json").read_text())["layers"].items():
        if n in first:
            assert (root / e["file"]).stat().st_mtime_ns == first[n]  # not solved again
    assert_same_database(db, serial)


DRIVER = """
import os, signal, sys
from _compress_task import make_task, tiny_config
from automl_compress.config import ExecutorConfig
from automl_compress.database.build import build_database
from automl_compress.distributed import RayExecutor

seen = []

def written(name):
    seen.append(name)
    print(name, flush=True)
    if sys.argv[3] == "kill" and len(seen) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: the driver just dies

ex = RayExecutor(ExecutorConfig(kind="ray", address=sys.argv[1]))
build_database(make_task(), tiny_config(), sys.argv[2], progress=False, on_layer_done=written,
               executor=ex)
"""


@pytest.mark.slow
def test_a_sigkilled_driver_process_resumes_on_the_same_cluster(local_ray, tmp_path):
    address = ray.get_runtime_context().gcs_address
    path = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    root = tmp_path / "db"

    def driver(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", DRIVER, address, str(root), mode], env=env,
                              capture_output=True, text=True, timeout=300)

    layers = {"conv1", "conv2", "fc1", "fc2"}
    killed = driver("kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    first = [w for w in killed.stdout.split() if w in layers]
    manifest = json.loads((root / "manifest.json").read_text())
    assert len(first) == 2 and sorted(manifest["layers"]) == sorted(first)
    assert not manifest["complete"]
    mtimes = {n: (root / e["file"]).stat().st_mtime_ns for n, e in manifest["layers"].items()}
    again = driver("resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(w for w in again.stdout.split() if w in layers) == sorted(layers - set(first))
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["layers"]) == 4
    for n, t in mtimes.items():
        assert (root / manifest["layers"][n]["file"]).stat().st_mtime_ns == t


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cfg = tiny_config("task.name=_compress_task:make_task", "alloc.objective=normalized")
    return pipeline.prepare(cfg, tmp_path_factory.mktemp("search"), progress=False)


def _search(prepared, method: str):
    ev = selection.evaluator(prepared, budget=10)
    tables, cost = prepared.tables, prepared.cfg.cost
    if method == "evo":
        start = allocate_dp(tables, BUDGET, cost)
        return evo_search(tables, BUDGET, start, ev, cost, offspring=4, stages=(0.5, 1.0)), ev
    return spdy_search(tables, BUDGET, ev, cost, inits=3, batch=2), ev


@pytest.mark.parametrize("method", ["evo", "spdy"])
def test_searches_on_ray_actors_match_local_results_and_counts(local_ray, prepared, method):
    local, ev_local = _search(prepared, method)
    ex = RayExecutor(RAY)
    try:
        remote, ev_ray = _search(dataclasses.replace(prepared, executor=ex), method)
    finally:
        ex.close()
    assert ev_local.score_many is None and ev_ray.score_many is not None
    assert remote.plan.key() == local.plan.key()
    assert remote.metric_val == local.metric_val and remote.start_val == local.start_val
    assert remote.spend == local.spend and ev_ray.calls == ev_local.calls
    assert remote.history == local.history
    assert ev_ray.cache == ev_local.cache  # every plan scored, at every fraction, the same


_CLI_TASK = ("task:\n  name: _compress_task:make_task\nmenu:\n  bits: [0, 2, 4, 8]\n"
             "  patterns: [dense, '2:4']\nsolver:\n  quant: gptq\n")


def _local_and_ray_runs(tmp_path, config: str, args: list[str]) -> dict:
    """Run one CLI command with --executor local and ray; each run's results with its plan."""
    from automl_compress.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(config)
    runs = {}
    for kind in ("local", "ray"):
        out = tmp_path / kind
        assert main([args[0], "--config", str(cfg), *args[1:], "--executor", kind,
                     "--out", str(out)]) == 0
        runs[kind] = json.loads((out / "results.json").read_text())
        runs[kind]["plan"] = json.loads((out / "plan.json").read_text())["layers"]
    return runs


def test_cli_compress_with_executor_ray_writes_the_local_run(local_ray, tmp_path):
    runs = _local_and_ray_runs(tmp_path, _CLI_TASK, ["compress", "--method", "evo",
                                                     "--budget-bits", "3", "--evaluations", "20"])
    for key in ("metric", "metric_val", "evaluations", "metric_calls", "forward_samples",
                "plan", "history"):
        assert runs["ray"][key] == runs["local"][key], key


def test_cli_train_with_executor_ray_writes_the_local_run(local_ray, tmp_path):
    config = _CLI_TASK + ("agent:\n  n_steps: 32\n  batch_size: 16\n  n_epochs: 1\n"
                          "  round_steps: 32\n  final_candidates: 3\n")
    runs = _local_and_ray_runs(tmp_path, config, ["train", "--budget-bits", "3", "--total-steps",
                                                  "64", "--evaluations", "24"])
    for key in ("metric", "metric_val", "evaluations", "metric_calls", "forward_samples", "plan"):
        assert runs["ray"][key] == runs["local"][key], key
