"""digits_cnn: real training on sklearn's digits, the weight cache, the splits, capture on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from automl_compress.capture import capture_hessians
from automl_compress.config import TaskConfig
from automl_compress.zoo import digits as digits_mod
from automl_compress.zoo import load_task, model_fingerprint


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("digits_cache")


@pytest.fixture(scope="module")
def task(cache):
    return load_task(TaskConfig(name="digits_cnn", cache_dir=str(cache)))


def _no_training(*args, **kwargs):
    raise AssertionError("the cached weights should have been reused, not retrained")


def test_dense_accuracy_and_contract(task):
    assert task.metric_name == "top1" and task.family == "digits_cnn"
    assert not task.model.training
    assert task.evaluate(task.model) >= 0.95
    assert sum(len(b) for b in task.calib) == 256
    assert all(b.shape[1:] == (1, 16, 16) for b in task.calib)
    # A model that predicts one class is near chance: the metric can fail.
    broken = digits_mod.DigitsCNN()
    with torch.no_grad():
        broken.fc2.weight.zero_()
        broken.fc2.bias.copy_(torch.arange(10.0))
    assert task.evaluate(broken) < 0.2


def test_cache_reused_same_weights(task, cache, monkeypatch):
    files = list(cache.glob("digits_cnn-*.safetensors"))
    assert len(files) == 1
    monkeypatch.setattr(digits_mod, "_train", _no_training)
    again = load_task(TaskConfig(name="digits_cnn", cache_dir=str(cache)))
    assert model_fingerprint(again.model) == model_fingerprint(task.model)
    # other hyperparameters -> another cache key (and here: a training run)
    with pytest.raises(AssertionError, match="reused"):
        load_task(TaskConfig(name="digits_cnn", options={"seed": 1}, cache_dir=str(cache)))


def test_corrupt_cache_is_retrained(tmp_path):
    cfg = TaskConfig(name="digits_cnn", options={"epochs": 2}, cache_dir=str(tmp_path))
    first = load_task(cfg)
    (path,) = tmp_path.glob("digits_cnn-*.safetensors")
    path.write_bytes(path.read_bytes()[:100] + b"garbage")
    with pytest.warns(UserWarning, match="could not be read"):
        fresh = load_task(cfg)
    assert model_fingerprint(fresh.model) == model_fingerprint(first.model)  # seeded training
    # the rewritten file is valid again
    hp = digits_mod.DigitsHParams(epochs=2)
    assert digits_mod._load_cached(path, hp) is not None


def test_splits_disjoint_and_fixed():
    d = digits_mod.digits_data(seed=0, calib_samples=100)
    for a, b in ((d.train, d.test), (d.train, d.val), (d.val, d.test)):
        assert len(np.intersect1d(a, b)) == 0
    assert np.isin(d.calib, d.train).all() and len(np.unique(d.calib)) == 100
    assert len(d.train) + len(d.test) + len(d.val) == len(d.labels) == 1797
    assert len(d.val) == round(0.15 * 1797) and len(d.test) == round(0.2 * 1797)
    again = digits_mod.digits_data(seed=0, calib_samples=100)
    assert np.array_equal(d.test, again.test) and np.array_equal(d.calib, again.calib)
    assert np.array_equal(d.val, again.val)
    other = digits_mod.digits_data(seed=1, calib_samples=100)
    assert not np.array_equal(d.test, other.test)


def test_capture_on_task(task):
    hs = capture_hessians(task.model, task.calib, task.forward)
    assert list(hs) == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert hs["conv2"].info.cols == 16 * 9 and hs["conv2"].info.stride == (2, 2)
    assert hs["fc1"].n_samples == 256
    assert hs["conv1"].n_samples == 256 * 16 * 16


def test_wide_sibling(cache):
    wide = load_task(TaskConfig(name="digits_cnn_wide", options={"epochs": 3},
                                cache_dir=str(cache)))
    narrow = digits_mod.DigitsCNN()
    names = [n for n, _ in wide.model.named_parameters()]
    assert names == [n for n, _ in narrow.named_parameters()]
    assert wide.model.conv1.out_channels == 2 * narrow.conv1.out_channels
    assert wide.evaluate(wide.model) >= 0.8
