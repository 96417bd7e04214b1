"""Tasks made from a model and inputs alone.

Either the user's model factory, or a local Hugging Face folder (``task.name: hf:PATH``).

Writing a :class:`~automl_compress.zoo.base.Task` (model, calibration batches, metric) is the main
hurdle for a new model. Given only a model and a list of input batches, the splits are made here:
the batches are shuffled with the seed and cut into calibration (half), validation (a quarter) and
test (the rest), and the metric is the fidelity of the compressed model's outputs to the dense
model's on inputs calibration never saw (−KL for logits, cosine for embeddings, −relative squared
error otherwise: ``task.distance``, the same distance the calibrated objectives use;
docs/objectives.md §2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from automl_compress.errors import TaskError
from automl_compress.zoo.base import Task, default_forward, fidelity_metric, hf_offline

CALIB_SHARE, VAL_SHARE = 0.5, 0.25
HF_PREFIX = "hf:"


def task_from_model(
    name: str, model: nn.Module, batches: Sequence[Any], distance: str = "mse", seed: int = 0,
    forward: Callable[[nn.Module, Any], Any] = default_forward, family: str | None = None,
) -> Task:
    """A Task whose metric is fidelity to the dense outputs, with the splits made here.

    Args:
        name: the task's name (its config key).
        model: the dense model (put in eval mode; never modified).
        batches: at least 3 input batches, each as ``forward`` takes it.
        distance: 'kl', 'cosine' or 'mse' (docs/objectives.md §2).
        seed: shuffles the batches before they are cut into the splits.
        forward: how to run the model on one batch (its output must be one tensor).
        family: recorded in policy manifests (default: the name).

    Raises:
        TaskError: fewer than 3 batches.
    """
    batches = list(batches)
    if len(batches) < 3:
        raise TaskError(f"task {name!r}: expected at least 3 input batches (calibration, "
                        f"validation and test are cut from them), found {len(batches)}; give "
                        "more or smaller batches")
    order = np.random.default_rng(seed).permutation(len(batches))
    n_cal = max(1, int(round(CALIB_SHARE * len(batches))))
    n_val = max(1, int(round(VAL_SHARE * len(batches))))
    n_cal = min(n_cal, len(batches) - 2)
    n_val = min(n_val, len(batches) - n_cal - 1)
    calib = [batches[i] for i in order[:n_cal]]
    val = [batches[i] for i in order[n_cal:n_cal + n_val]]
    test = [batches[i] for i in order[n_cal + n_val:]]
    model.eval()
    return Task(
        name=name, family=family or name, model=model, calib=calib,
        evaluate=fidelity_metric(model, forward, distance, test, name),
        metric_name=f"fidelity_{distance}", forward=forward,
        validate=fidelity_metric(model, forward, distance, val, name), distance=distance,
    )


# ---------------------------------------------------------------------------------------------
# hf:PATH


class MeanPooled(nn.Module):
    """A transformers encoder whose output is its mask-aware mean-pooled last hidden state."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled encoder embeddings (padding excluded)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def hf_task(path: str, text_file: str, batch_size: int = 16, max_length: int = 128,
            seed: int = 0) -> Task:
    """A local Hugging Face encoder folder, judged by the cosine of its mean-pooled embeddings.

    Loaded offline with transformers' ``AutoModel`` and ``AutoTokenizer`` (nothing is downloaded);
    the inputs are the non-empty lines of ``text_file``, tokenised in batches.

    Args:
        path: the model folder (config.json, weights, tokenizer files).
        text_file: UTF-8 text, one input per line.
        batch_size: lines per batch.
        max_length: tokens per input at most.
        seed: shuffles the batches before they are cut into the splits.

    Raises:
        TaskError: transformers missing, the folder or the text file unreadable, too few lines.
    """
    folder, text = Path(path).expanduser(), Path(text_file).expanduser()
    if not (folder / "config.json").is_file():
        raise TaskError(f"hf:{path}: expected a Hugging Face model folder with config.json, "
                        f"found none at {str(folder)!r}")
    if not text.is_file():
        raise TaskError(f"hf:{path}: task.options.text_file {str(text)!r} does not exist; give "
                        "a UTF-8 file with one input text per line")
    lines = [ln.strip() for ln in text.read_text(encoding="utf-8").splitlines() if ln.strip()]
    try:
        with hf_offline():
            from transformers import AutoModel, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            encoder = AutoModel.from_pretrained(str(folder), local_files_only=True).float()
    except ImportError as exc:
        raise TaskError(f"hf:{path} needs transformers ({exc}); install the models extra: "
                        'pip install "automl-compress[models]"') from exc
    except OSError as exc:
        raise TaskError(f"hf:{path}: transformers could not load the folder offline ({exc})") \
            from exc
    batches = []
    for i in range(0, len(lines), batch_size):
        enc = tokenizer(lines[i:i + batch_size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return task_from_model(f"{HF_PREFIX}{path}", MeanPooled(encoder).eval(), batches,
                           distance="cosine", seed=seed, family=f"hf:{folder.name}")
