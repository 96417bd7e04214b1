"""Export: bit packing, round trip to a float model with identical outputs, plan inside."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from _compress_task import TinyNet, make_task, tiny_config

from automl_compress.database.allocate import allocate_dp, plan_bits
from automl_compress.database.build import build_database
from automl_compress.errors import CorruptCacheError, InvalidInputError
from automl_compress.evaluate import correct
from automl_compress.export import (
    export_compressed,
    load_compressed,
    pack_bits,
    read_plan,
    unpack_bits,
)
from automl_compress.stitch import stitch


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 2**bits, size=1001).astype(np.uint8)
    packed = pack_bits(values, bits)
    assert packed.nbytes == math.ceil(1001 * bits / 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits, 1001), values)
    with pytest.raises(InvalidInputError):
        pack_bits(np.array([2**bits], dtype=np.uint16), bits)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    task = make_task()
    cfg = tiny_config()
    db = build_database(task, cfg, tmp_path_factory.mktemp("db"), progress=False)
    return task, cfg, db


@pytest.mark.parametrize("budget", [3.0, 1.5])
def test_export_round_trip_gives_identical_outputs(setup, tmp_path, budget):
    task, cfg, db = setup
    plan = allocate_dp(db.tables(), budget, cfg.cost)
    model = correct(task.model, stitch(task.model, db, plan), task, plan, cfg.eval)
    path = tmp_path / "compressed.safetensors"
    sizes = export_compressed(path, model, db, plan)
    # from a fresh architecture (factory), not from the stitched object
    reloaded = load_compressed(path, lambda: TinyNet(8))
    x = torch.cat(list(task.calib))
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))
    for name in plan.layers:
        assert torch.equal(dict(model.named_modules())[name].weight,
                           dict(reloaded.named_modules())[name].weight)
    assert read_plan(path).to_dict() == plan.to_dict()
    # packed values take exactly their bit-width; metadata (scale/zero/mask) is stored beside
    values_bits = sum(
        sum(b * (dict(db.layer(n).options)[(lp.pattern, b)].mask[i].sum().item()
                 if lp.pattern != "dense" else db.layer(n).info.cols)
            for i, b in enumerate(lp.row_bits) if b > 0)
        for n, lp in plan.layers.items()
    )
    assert sizes["packed_weight_bytes"] <= values_bits / 8 + 4 * 8
    assert values_bits <= plan_bits(plan, db.tables(), cfg.cost)
    assert path.stat().st_size < 4 * sum(p.numel() for p in task.model.parameters())


def test_loader_rejects_wrong_architecture_and_garbage(setup, tmp_path):
    task, cfg, db = setup
    plan = allocate_dp(db.tables(), 3.0, cfg.cost)
    model = stitch(task.model, db, plan)
    path = tmp_path / "c.safetensors"
    export_compressed(path, model, db, plan)
    with pytest.raises(InvalidInputError, match="does not match"):
        load_compressed(path, lambda: TinyNet(16))
    # a Task works as the architecture too, and the task's model is not touched
    before = copy.deepcopy(task.model.state_dict())
    load_compressed(path, task)
    assert all(torch.equal(v, before[k]) for k, v in task.model.state_dict().items())
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CorruptCacheError):
        load_compressed(bad, task)
