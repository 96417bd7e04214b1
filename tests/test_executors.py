"""The executor registry: local runs import no Ray, a missing Ray or a bad setting is a named
error with what to do, and the command line sets ``executor.*``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from automl_compress import executors
from automl_compress.cli import main
from automl_compress.config import ExecutorConfig
from automl_compress.errors import ConfigError, ExecutorError

TESTS = Path(__file__).resolve().parent


def test_a_local_build_imports_no_ray(tmp_path):
    code = (
        "import sys\n"
        "from _compress_task import tiny_config\n"
        "from automl_compress.commands import build_db\n"
        "cfg = tiny_config('task.name=_compress_task:make_task', 'alloc.objective=normalized')\n"
        f"assert build_db.run(cfg, {str(tmp_path / 'run')!r}) == 0\n"
        "assert 'ray' not in sys.modules, 'the local executor imported ray'\n"
        "assert 'automl_compress.distributed' not in sys.modules\n"
    )
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "run" / "db" / "manifest.json").is_file()


def test_ray_without_the_extra_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(executors, "ray_available", lambda: False)
    with pytest.raises(ExecutorError, match=r"automl-compress\[distributed\]"):
        executors.get_executor(ExecutorConfig(kind="ray"))


def test_the_local_executor_scores_one_by_one():
    with executors.open_executor(ExecutorConfig()) as ex:
        assert ex.kind == "local" and not ex.distributed and ex.scorer(object()) is None


@pytest.mark.parametrize("bad, match", [
    ({"kind": "dask"}, "executor.kind"),
    ({"workers": 0}, "executor.workers"),
    ({"num_cpus": 0}, "executor.num_cpus"),
    ({"num_gpus": -1}, "executor.num_gpus"),
    ({"max_retries": -1}, "executor.max_retries"),
])
def test_bad_executor_settings_name_the_key(bad, match):
    with pytest.raises(ConfigError, match=match):
        ExecutorConfig(**bad)


@pytest.mark.parametrize("command", [
    ["build-db"],
    ["compress", "--method", "evo", "--budget-bits", "3"],
    ["train", "--budget-bits", "3"],
])
def test_cli_executor_flags_set_the_config(command, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("executor:\n  max_retries: 5\n")
    code = main([*command, "--config", str(cfg), "--out", str(tmp_path / "run"), "--executor",
                 "ray", "--address", "ray://head:10001", "--workers", "4", "--print-config"])
    assert code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)["executor"]
    assert resolved["kind"] == "ray" and resolved["address"] == "ray://head:10001"
    assert resolved["workers"] == 4 and resolved["max_retries"] == 5


@pytest.mark.slow
def test_an_unreachable_cluster_names_its_address():
    pytest.importorskip("ray")
    code = (
        "from automl_compress.config import ExecutorConfig\n"
        "from automl_compress.errors import ExecutorError\n"
        "from automl_compress.executors import get_executor\n"
        "try:\n"
        "    get_executor(ExecutorConfig(kind='ray', address='ray://127.0.0.1:1'))\n"
        "except ExecutorError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)  # Ray Client gives up after about 30 s
    assert "cannot reach the Ray cluster at executor.address='ray://127.0.0.1:1'" in out.stdout, \
        out.stderr[-2000:]
