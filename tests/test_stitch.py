"""Stitching plans from the database: exact additivity, no side effects, statistics corrections."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _compress_task import make_task, tiny_config

from automl_compress.capture import capture_hessians
from automl_compress.config import EvalConfig
from automl_compress.database.allocate import allocate_dp, plan_error
from automl_compress.database.build import build_database
from automl_compress.errors import InvalidInputError
from automl_compress.evaluate import bias_correct, bn_reestimate, bn_shift, correct, dense_stats
from automl_compress.plan import CompressionPlan, LayerPlan
from automl_compress.stitch import stitch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    task = make_task()
    db = build_database(task, tiny_config(), tmp_path_factory.mktemp("db"), progress=False)
    hess = capture_hessians(task.model, task.calib, task.forward)
    return task, db, hess


def random_plan(db, seed):
    rng = np.random.default_rng(seed)
    layers = {}
    for info in db.order:
        t = db.table(info.name)
        p = t.patterns[rng.integers(len(t.patterns))]
        layers[info.name] = LayerPlan(p, tuple(int(b) for b in rng.choice(t.bits, info.rows)))
    return CompressionPlan(layers, meta={"method": "test"})


def _dense_inputs(task, names):
    """Each layer's inputs in the dense model on the calibration batches (forward pre-hooks)."""
    mods = dict(task.model.named_modules())
    seen = {n: [] for n in names}
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach()))
             for n in names]
    try:
        with torch.no_grad():
            for batch in task.calib:
                task.forward(task.model, batch)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _output_error(dense, comp, inputs):
    """Per output channel, the mean squared output change of one layer on the same inputs,
    ‖(w − ŵ)Xᵀ‖²/n with n the input vectors (conv: one per output position), in float64."""
    dense, comp = copy.deepcopy(dense).double(), copy.deepcopy(comp).double()
    total, count = 0.0, 0
    with torch.no_grad():
        for x in inputs:
            d = dense(x.double()) - comp(x.double())
            d = d.transpose(0, 1).reshape(d.shape[1], -1)  # (rows, vectors)
            total = total + (d**2).sum(1)
            count += d.shape[1]
    return total / count


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stitched_error_equals_sum_of_table_entries(setup, seed):
    """Each stitched layer's output error on the dense model's calibration inputs, measured by
    running the layer (not through H), is the sum of its table entries row by row."""
    task, db, _ = setup
    plan = random_plan(db, seed)
    model = stitch(task.model, db, plan)
    dense = dict(task.model.named_modules())
    comp = dict(model.named_modules())
    inputs = _dense_inputs(task, [info.name for info in db.order])
    total = 0.0
    for info in db.order:
        direct = _output_error(dense[info.name], comp[info.name], inputs[info.name])
        lp = plan.layers[info.name]
        t = db.table(info.name)
        idx = np.searchsorted(t.bits, lp.row_bits)
        table = t.errors[np.arange(info.rows), t.patterns.index(lp.pattern), idx]
        np.testing.assert_allclose(direct.numpy(), table, rtol=1e-6, atol=1e-12)
        total += float(direct.sum())
        W_hat = comp[info.name].weight.detach().flatten(1)
        removed = np.asarray(lp.row_bits) == 0
        assert bool((W_hat[torch.from_numpy(removed)] == 0).all())
    assert total == pytest.approx(plan_error(plan, db.tables()), rel=1e-6)


def test_user_model_is_never_modified(setup):
    task, db, _ = setup
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    plan = allocate_dp(db.tables(), 2.5)
    model = stitch(task.model, db, plan)
    from automl_compress.config import EvalConfig
    from automl_compress.evaluate import correct

    correct(task.model, model, task, plan, EvalConfig())
    for k, v in task.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model is not task.model
    assert not torch.equal(model.fc1.weight, task.model.fc1.weight)


def test_rtn_source_and_bad_plans(setup):
    task, db, _ = setup
    plan = CompressionPlan(
        {i.name: LayerPlan("dense", (4,) * i.rows) for i in db.order}, meta={"method": "rtn"}
    )
    m_rtn = stitch(task.model, db, plan)
    m_tab = stitch(task.model, db, CompressionPlan(plan.layers, meta={"method": "dp"}))
    assert not torch.equal(m_rtn.fc1.weight, m_tab.fc1.weight)
    bad = CompressionPlan({"fc1": LayerPlan("dense", (4,) * 3)})
    with pytest.raises(InvalidInputError, match="32 rows"):
        stitch(task.model, db, bad)
    with pytest.raises(InvalidInputError, match="not stored"):
        stitch(task.model, db, CompressionPlan({"conv1": LayerPlan("2:4", (4,) * 8)}))


def _outputs(model, module_name, task):
    outs = []
    mod = dict(model.named_modules())[module_name]
    h = mod.register_forward_hook(lambda m, i, o: outs.append(o.detach()))
    with torch.no_grad():
        for b in task.calib:
            task.forward(model, b)
    h.remove()
    return torch.cat(outs)


def test_bias_correction_restores_the_mean_output(setup):
    task, db, _ = setup
    plan = CompressionPlan({"fc2": LayerPlan("dense", (2,) * 5 + (0,) * 5)})
    model = stitch(task.model, db, plan)
    y_dense = _outputs(task.model, "fc2", task)
    y_before = _outputs(model, "fc2", task)
    assert (y_before.mean(0) - y_dense.mean(0)).abs().max() > 1e-3
    assert bias_correct(task.model, model, task, ["fc2"]) == ["fc2"]
    y_after = _outputs(model, "fc2", task)  # fc2's inputs are unchanged (only fc2 compressed)
    torch.testing.assert_close(y_after.mean(0), y_dense.mean(0), rtol=1e-5, atol=1e-5)


def test_grouped_conv_bias_correction_from_cached_sums(setup):
    """The cached input sums (one dense pass per task) give the exact mean output change of a
    grouped, padded conv; with them the corrections run the dense model zero times and agree
    with the corrections that measure the statistics themselves."""
    task, db, _ = setup
    plan = CompressionPlan({"conv2": LayerPlan("dense", (2,) * 8 + (0,) * 8)})
    stats = dense_stats(task.model, task)
    model = stitch(task.model, db, plan)
    assert bias_correct(task.model, model, task, ["conv2"], stats) == ["conv2"]
    y_dense = _outputs(task.model, "conv2", task)
    y_after = _outputs(model, "conv2", task)  # conv2's inputs are unchanged
    channel_mean = lambda y: y.transpose(0, 1).reshape(y.shape[1], -1).mean(1)  # noqa: E731
    torch.testing.assert_close(channel_mean(y_after), channel_mean(y_dense), rtol=1e-5, atol=1e-5)
    cfg = EvalConfig()
    full = random_plan(db, 3)
    copies = [stitch(task.model, db, full) for _ in range(2)]  # before the hook: copies keep hooks
    dense_calls = []
    h = task.model.register_forward_pre_hook(lambda m, i: dense_calls.append(1))
    try:
        cached = correct(task.model, copies[0], task, full, cfg, stats)
        assert dense_calls == []
        fresh = correct(task.model, copies[1], task, full, cfg)
        assert len(dense_calls) == len(task.calib)  # one dense pass when not cached
    finally:
        h.remove()
    for (n, a), b in zip(cached.state_dict().items(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)


def test_bn_reestimation_matches_calibration_statistics(setup):
    task, db, _ = setup
    plan = CompressionPlan({"conv1": LayerPlan("dense", (2,) * 8)})
    model = stitch(task.model, db, plan)
    assert bn_reestimate(model, task) == 2
    pre = _outputs(model, "conv1", task)
    mean = pre.transpose(0, 1).reshape(pre.shape[1], -1).mean(1)
    torch.testing.assert_close(model.bn1.running_mean, mean, rtol=1e-4, atol=1e-5)
    assert not model.training and model.bn1.momentum == task.model.bn1.momentum


def _bn_out_moments(model, name, task):
    y = _outputs(model, name, task)
    y = y.transpose(0, 1).reshape(y.shape[1], -1).to(torch.float64)
    return y.mean(1), y.var(1, unbiased=False)


def test_bn_shift_keeps_dense_statistics_and_restores_output_moments(setup):
    task, db, _ = setup
    same = stitch(task.model, db, CompressionPlan({}))
    assert bn_shift(task.model, same, task) == 2  # nothing compressed: nothing moves
    for a, b in ((same.bn1, task.model.bn1), (same.bn2, task.model.bn2)):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-5, atol=0)
    plan = CompressionPlan({"conv1": LayerPlan("dense", (2,) * 8)})
    model = stitch(task.model, db, plan)
    assert (model.bn1.running_mean == task.model.bn1.running_mean).all()
    bn_shift(task.model, model, task)
    # bn1's output has the dense model's per-channel mean and variance on the calibration data
    mean_d, var_d = _bn_out_moments(task.model, "bn1", task)
    mean_c, var_c = _bn_out_moments(model, "bn1", task)
    torch.testing.assert_close(mean_c, mean_d, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var_c, var_d, rtol=1e-4, atol=1e-6)
    assert not torch.equal(model.bn1.running_mean, task.model.bn1.running_mean)
    assert not model.training
