"""Tasks from a model and inputs alone (dotted paths), and from a local Hugging Face folder."""

from __future__ import annotations

import importlib.util
import json
import textwrap

import pytest
import torch

from automl_compress.cli import main
from automl_compress.config import TaskConfig
from automl_compress.errors import TaskError
from automl_compress.zoo import load_task

MODULE = '''
import torch
from torch import nn

def make_model(width=16):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 5))

def make_inputs(batches=8):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, 8, generator=g) for _ in range(batches)]
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "usermodels.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_model_and_inputs_make_a_task_with_disjoint_splits(user_module):
    cfg = TaskConfig(name="usermodels:make_model", options={"width": 12},
                     inputs="usermodels:make_inputs", inputs_options={"batches": 8},
                     distance="kl")
    task = load_task(cfg)
    assert task.distance == "kl" and task.metric_name == "fidelity_kl"
    assert task.model[0].out_features == 12
    val = [b for b, _ in task.validate.batches]
    test = [b for b, _ in task.evaluate.batches]
    ids = [{id(b) for b in s} for s in (task.calib, val, test)]
    assert len(task.calib) == 4 and len(val) == 2 and len(test) == 2
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
    assert task.evaluate(task.model) == pytest.approx(0.0, abs=1e-12)  # −KL of the dense model
    worse = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.ReLU(), torch.nn.Linear(12, 5))
    assert task.validate(worse) < -0.01


def test_model_factory_must_return_a_module_and_inputs_must_suffice(user_module):
    with pytest.raises(TaskError, match="expected a torch.nn.Module"):
        load_task(TaskConfig(name="usermodels:make_inputs", inputs="usermodels:make_inputs"))
    with pytest.raises(TaskError, match="at least 3 input batches"):
        load_task(TaskConfig(name="usermodels:make_model", inputs="usermodels:make_inputs",
                             inputs_options={"batches": 2}))


def test_compress_runs_on_a_model_and_inputs(user_module, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task:\n  name: usermodels:make_model\n  inputs: usermodels:make_inputs\n"
                   "  distance: kl\nmenu:\n  bits: [0, 2, 4, 8]\n  patterns: [dense]\n"
                   "solver:\n  quant: gptq\n")
    out = tmp_path / "run"
    assert main(["compress", "--config", str(cfg), "--method", "dp", "--budget-bits", "4",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["metric_name"] == "fidelity_kl" and res["metric"] <= 0.0
    assert res["metric_dense"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.models
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="needs transformers (the models extra)")
def test_hf_folder_loads_offline_and_scores_by_embedding_cosine(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["the", "a", "model", "layer", "weight", "compress", "small", "quick", "test", "of",
             "bits"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    folder = tmp_path / "tiny-bert"
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    text = tmp_path / "inputs.txt"
    text.write_text("\n".join(" ".join(words[i % 7:i % 7 + 4]) for i in range(24)))
    task = load_task(TaskConfig(name=f"hf:{folder}", options={"text_file": str(text),
                                                              "batch_size": 4}))
    assert task.distance == "cosine" and len(task.calib) == 3
    assert task.validate(task.model) == pytest.approx(1.0, abs=1e-6)
    assert task.evaluate(task.model) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(TaskError, match="config.json"):
        load_task(TaskConfig(name=f"hf:{tmp_path / 'nothing'}", options={"text_file": str(text)}))
