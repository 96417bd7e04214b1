"""Calibrated objectives: what each weight means, checked against an independent computation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _compress_task import make_task, tiny_config
from torch import nn

from automl_compress import pipeline
from automl_compress.distances import get_distance
from automl_compress.errors import ObjectiveError
from automl_compress.loss_objective import fit_layer_weight
from automl_compress.objectives import (
    ObjectiveName,
    fisher_diagonal,
    output_energy,
    weigh,
)
from automl_compress.plan import CompressionPlan, LayerPlan
from automl_compress.zoo.base import Task


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cfg = tiny_config("alloc.objective=normalized", "task.name=_compress_task:make_task")
    return pipeline.prepare(cfg, tmp_path_factory.mktemp("obj"), progress=False)


def test_normalized_weights_are_one_over_the_dense_output_energy(prepared):
    """1 / weight = Σ_r ½ w_r H w_rᵀ, the layer's 0-bit table errors (built from the captured H,
    an independent computation from the forward-hook energies)."""
    obj = prepared.objective
    assert obj.name == ObjectiveName.NORMALIZED
    for t in prepared.raw_tables:
        energy = float(t.errors[:, 0, t.bits.index(0)].sum())
        w = obj.weights[t.info.name]
        assert np.allclose(w, w[0]) and w[0] > 0
        assert 1.0 / w[0] == pytest.approx(energy, rel=1e-6)
    # the weighted tables are the raw ones times the weights; a layer's full removal costs 1
    for raw, wt in zip(prepared.raw_tables, prepared.tables, strict=True):
        assert wt.errors[:, 0, wt.bits.index(0)].sum() == pytest.approx(1.0, rel=1e-6)
        assert np.allclose(wt.errors, raw.errors * obj.weights[raw.info.name][:, None, None])


def test_loss_objective_equals_a_direct_one_layer_evaluation(prepared):
    """The stored measurement of (layer, option) is the KL of the corrected model with only that
    layer compressed, recomputed here with torch's own kl_div."""
    obj = pipeline.load_objective(prepared, "loss", progress=False)
    t = prepared.raw_tables[1]
    plan = CompressionPlan({t.info.name: LayerPlan("dense", (4,) * t.info.rows)})
    model = pipeline.stitched_model(prepared, plan)
    batches = prepared.task.calib[: prepared.cfg.alloc.loss_batches]
    with torch.no_grad():
        direct = np.mean(np.concatenate([
            F.kl_div(F.log_softmax(model(b), 1), F.log_softmax(prepared.task.model(b), 1),
                     log_target=True, reduction="none").sum(1).numpy() for b in batches]))
    assert obj.measured[t.info.name]["dense/4"] == pytest.approx(direct, rel=1e-4)  # fp32 logits
    # its weight is the geometric-mean ratio of measured to table error over the options
    errs, meas = [], []
    for key, d in obj.measured[t.info.name].items():
        p, b = key.rsplit("/", 1)
        errs.append(t.errors[:, t.patterns.index(p), t.bits.index(int(b))].sum())
        meas.append(d)
    ok = (np.array(errs) > 0) & (np.array(meas) > 0)
    expect = np.exp(np.mean(np.log(np.array(meas)[ok] / np.array(errs)[ok])))
    assert obj.weights[t.info.name][0] == pytest.approx(expect, rel=1e-9)
    # cached: the second call reads the file (same numbers, no recomputation)
    again = pipeline.load_objective(prepared, "loss", progress=False)
    assert again.measured == obj.measured and again.cost == obj.cost


def test_fit_layer_weight_ignores_zero_options():
    assert fit_layer_weight(np.array([1.0, 4.0, 0.0]), np.array([2.0, 8.0, 0.0])) == \
        pytest.approx(2.0)
    assert fit_layer_weight(np.array([1.0]), np.array([0.0])) == 0.0


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def _tiny_task(forward=None, distance="kl"):
    torch.manual_seed(0)
    model = _Tiny()
    with torch.no_grad():  # a BN that rescales channels very differently
        model.bn.running_var.copy_(torch.logspace(-2, 1, 8))
    model.eval()
    calib = [torch.randn(128, 6) for _ in range(2)]
    kw = {"forward": forward} if forward is not None else {}
    return Task("tiny", "tiny", model, calib, lambda m: 0.0, "none", distance=distance, **kw)


@pytest.mark.parametrize("distance", ["kl", "mse", "cosine"])
def test_fisher_weights_match_a_finite_difference_estimate(distance):
    """E[D(y + ε z e_r)] / ε² ≈ c_r: noise of variance ε² injected into row r's output moves the
    distance by ε² times its weight (the BatchNorm after fc1 is accounted for)."""
    task = _tiny_task(distance=distance)
    w = fisher_diagonal(task, ["fc1"], probes=512, seed=0)["fc1"]
    dist = get_distance(distance)
    eps, draws = 1e-3, 64
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        refs = [task.model(b) for b in task.calib]
    for r in (0, 4, 7):
        def noise(module, inputs, out, r=r):
            out = out.clone()
            out[:, r] += eps * torch.randn(out.shape[0], generator=gen)
            return out

        h = task.model.fc1.register_forward_hook(noise)
        with torch.no_grad():
            d = np.mean([float(dist.value(task.model(b), ref).mean())
                         for _ in range(draws) for b, ref in zip(task.calib, refs, strict=True)])
        h.remove()
        assert d / eps**2 == pytest.approx(w[r], rel=0.15)
    assert w.max() / w.min() > 10  # the BN's scales show up in the weights


def test_output_energy_is_the_mean_squared_output_without_bias():
    task = _tiny_task()
    x = torch.cat(task.calib)
    with torch.no_grad():
        y = task.model.fc1(x) - task.model.fc1.bias
    assert output_energy(task, ["fc1"])["fc1"] == pytest.approx(float((y.double() ** 2).mean(0)
                                                                      .sum()), rel=1e-6)
    centred = float(y.double().var(0, unbiased=False).sum())
    assert output_energy(task, ["fc1"], centered=True)["fc1"] == pytest.approx(centred, rel=1e-6)


def test_fisher_needs_gradients_and_tensor_outputs():
    def no_grad_forward(model, batch):
        with torch.no_grad():
            return model(batch)

    with pytest.raises(ObjectiveError, match="without gradients"):
        fisher_diagonal(_tiny_task(forward=no_grad_forward), ["fc1"], probes=1)
    with pytest.raises(Exception, match="one floating tensor"):
        fisher_diagonal(_tiny_task(forward=lambda m, b: {"out": m(b)}), ["fc1"], probes=1)


def test_non_finite_weights_name_the_layer():
    task = _tiny_task(distance="mse")
    with torch.no_grad():
        task.model.fc2.weight[0, 0] = float("inf")
    with pytest.raises(ObjectiveError, match="'fc1'"):
        fisher_diagonal(task, ["fc1"], probes=1)


def test_weigh_raw_is_identity(prepared):
    raw = pipeline.load_objective(prepared, "raw")
    assert weigh(prepared.raw_tables, raw) == prepared.raw_tables


def test_user_task_gets_a_validation_split_from_calibration(tmp_path):
    task = make_task()
    bare = dataclasses.replace(task, validate=None)
    from automl_compress.zoo.base import with_validation

    with pytest.warns(UserWarning, match="no validation split"):
        t = with_validation(bare)
    assert len(t.calib) == 3 and t.calib[-1] is bare.calib[2]
    assert t.validate(t.model) == pytest.approx(0.0, abs=1e-12)  # −KL of the dense model
    assert t.validate(nn.Sequential(nn.Flatten(), nn.Linear(64, 10))) < -0.1
