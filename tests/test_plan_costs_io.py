import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from automl_compress.config import CostConfig
from automl_compress.database.costs import kept_per_row, pattern_fits, row_bits
from automl_compress.database.tables import LayerTable
from automl_compress.errors import CorruptCacheError, InvalidInputError
from automl_compress.io import atomic_write_json, exclusive_lock
from automl_compress.plan import CompressionPlan, LayerPlan
from automl_compress.specs import LayerInfo


def test_row_bits_accounting():
    cost = CostConfig()
    meta = cost.scale_bits + cost.zero_bits
    assert row_bits(64, 0, "dense") == 0.0
    assert row_bits(64, 4, "dense") == 64 * 4 + meta
    # 2:4 keeps 32 values, each with a 2-bit index.
    assert row_bits(64, 4, "2:4") == 32 * 4 + 32 * 2 + meta
    # 75 % unstructured keeps 16 values plus a 1-bit mask per weight.
    assert row_bits(64, 8, "75%") == 16 * 8 + 64 + meta
    assert kept_per_row(10, "50%") == 5
    assert pattern_fits(147, "2:4") is False and pattern_fits(148, "2:4") is True


def test_plan_json_round_trip(tmp_path):
    plan = CompressionPlan(
        {"conv1": LayerPlan("dense", (4, 4, 0, 8)), "fc": LayerPlan("2:4", (3, 2))},
        meta={"method": "dp", "budget_bits": 3.0},
    )
    path = tmp_path / "plan.json"
    plan.save(path)
    again = CompressionPlan.load(path)
    assert again.layers == plan.layers and dict(again.meta) == dict(plan.meta)
    assert again.key() == plan.key() and again.to_dict() == plan.to_dict()
    assert json.loads(path.read_text())["layers"]["fc"]["row_bits"] == [3, 2]


def test_plan_rejects_bad_bits_and_corrupt_files(tmp_path):
    with pytest.raises(InvalidInputError, match="0 or 2..8"):
        LayerPlan("dense", (1,))
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    with pytest.raises(CorruptCacheError, match="plan.json"):
        CompressionPlan.load(bad)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_json(tmp_path / "a.json", {"x": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_exclusive_lock_names_the_holder_and_frees_when_it_is_killed(tmp_path):
    lock = tmp_path / "sub" / ".lock"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from automl_compress.io import exclusive_lock\n"
         f"with exclusive_lock({str(lock)!r}):\n    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        seen = []

        def on_wait(who):
            seen.append(who)
            holder.kill()  # the operating system drops a dead holder's lock

        with exclusive_lock(lock, on_wait=on_wait):
            assert lock.read_text().strip() == f"pid {os.getpid()}"
        assert seen == [f"pid {holder.pid}"]
    finally:
        holder.kill()
        holder.wait()


def test_layer_table_error_is_a_sum_of_entries():
    rng = np.random.default_rng(0)
    info = LayerInfo(name="fc", kind="linear", rows=5, cols=8)
    errors = rng.random((5, 2, 3))
    table = LayerTable(info, bits=(0, 4, 8), patterns=("dense", "2:4"), errors=errors)
    bits = np.array([0, 4, 8, 8, 4])
    expect = errors[0, 1, 0] + errors[1, 1, 1] + errors[2, 1, 2] + errors[3, 1, 2] + errors[4, 1, 1]
    assert math.isclose(table.error_of("2:4", bits), expect)
    ob = table.option_bits()
    assert ob.shape == (2, 3) and ob[0, 0] == 0.0 and ob[1, 2] == row_bits(8, 8, "2:4")
    with pytest.raises(ValueError, match="shape"):
        LayerTable(info, bits=(0, 4), patterns=("dense",), errors=errors)
