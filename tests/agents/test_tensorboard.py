"""TensorBoard output of a search: tags read back from the event files and served over HTTP."""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from synth import synth_config, synth_tables
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from automl_compress.agents.callbacks import Progress
from automl_compress.agents.hierarchical import Search
from automl_compress.database.allocate import plan_error

SEARCH_SCALARS = {"episode/reward", "episode/metric", "episode/avg_bits", "episode/proxy_error",
                  "episode/projections", "search/best_metric",
                  "controllers/layer_controller/expected_moves",
                  "controllers/channel_controller/expected_moves"}


@pytest.fixture(scope="module")
def tb_dir(tmp_path_factory) -> Path:
    tables = synth_tables(0)
    cfg = synth_config(3.0)
    cfg = dataclasses.replace(cfg, agent=dataclasses.replace(
        cfg.agent, total_steps=256, n_steps=64, batch_size=32, n_epochs=1, round_steps=128,
        final_candidates=1))
    out = tmp_path_factory.mktemp("run") / "tb"
    s = Search(tables, cfg, metric_fn=lambda p: math.exp(-plan_error(p, tables) / 500.0),
               metric_dense=1.0, tb_dir=out, progress=Progress(256))
    s.writer.config("seed: 0")
    s.train(256)
    s.final_candidates()
    s.close()
    return out


def _acc(path: Path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_search_run_tags(tb_dir):
    tags = _acc(tb_dir / "search").Tags()
    assert set(tags["scalars"]) >= SEARCH_SCALARS
    assert "episode/allocation" in tags["images"]
    assert {"config/text_summary", "plan/best/text_summary"} <= set(tags["tensors"])
    acc = _acc(tb_dir / "search")
    avg = [e.value for e in acc.Scalars("episode/avg_bits")]
    assert max(avg) <= 3.0 + 1e-6  # every logged episode within budget
    best = [e.value for e in acc.Scalars("search/best_metric")]
    assert best == sorted(best)  # the best only improves
    # one point per training turn (256 steps in turns of 128: one turn per controller)
    for name in ("layer_controller", "channel_controller"):
        moves = acc.Scalars(f"controllers/{name}/expected_moves")
        assert len(moves) == 1 and all(e.value > 0.0 for e in moves)


def test_controller_runs_have_sb3_stats(tb_dir):
    for run in ("layer_controller", "channel_controller"):
        tags = set(_acc(tb_dir / run).Tags()["scalars"])
        assert any(t.startswith("train/") for t in tags), (run, tags)
        assert any(t.startswith("rollout/") for t in tags), (run, tags)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tensorboard_serves_the_tags(tb_dir):
    port = _free_port()
    exe = Path(sys.executable).parent / "tensorboard"
    proc = subprocess.Popen(
        [str(exe), "--logdir", str(tb_dir), "--host", "127.0.0.1", "--port", str(port),
         "--reload_interval", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, tags = time.monotonic() + 60.0, {}
        while time.monotonic() < deadline:
            try:
                url = f"http://127.0.0.1:{port}/data/plugin/scalars/tags"
                with urllib.request.urlopen(url, timeout=5) as r:
                    tags = json.loads(r.read())
                if set(tags.get("search", {})) >= SEARCH_SCALARS:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert set(tags.get("search", {})) >= SEARCH_SCALARS, tags
        assert any(t.startswith("train/") for t in tags.get("layer_controller", {}))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/images/tags",
                                    timeout=5) as r:
            assert "episode/allocation" in json.loads(r.read()).get("search", {})
    finally:
        proc.kill()
        proc.wait(timeout=10)
