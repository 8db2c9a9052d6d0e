"""English sentences from bundled, offline sources: calibration text (Python's own documentation,
`pydoc_data.topics`) and evaluation text from other sources (scikit-learn's data-set descriptions,
the system's software licences), and the sentence embedding of a text encoder's token states.
No torch, no tokenizer."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import numpy as np


def _sentences(texts: list[str]) -> tuple[str, ...]:
    """Sentences of 8 to 40 words, in order, no duplicates, none that is mostly markup."""
    found: dict[str, None] = {}
    for text in texts:
        text = re.sub(r"\s+", " ", text)
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            words = sentence.split()
            if 8 <= len(words) <= 40 and sentence.endswith(".") and not re.search(r"[*=>{}|]{2}|\*\*|::", sentence):
                found.setdefault(sentence, None)
    return tuple(found)


@cache
def english_sentences() -> tuple[str, ...]:
    """Sentences of 8 to 40 words from Python's own documentation, in a fixed order, no duplicates."""
    from pydoc_data.topics import topics

    return _sentences([topics[key] for key in sorted(topics)])


#: the licence texts Debian-based systems keep (legal English, far from programming documentation)
LICENSES = Path("/usr/share/common-licenses")


@cache
def other_sentences() -> tuple[str, ...]:
    """English from other sources than `english_sentences`, for evaluation: the descriptions of
    scikit-learn's bundled data sets (where they came from, what they measure) and, where the
    system has them, the software licences in /usr/share/common-licenses (GPL, Apache, MPL...)."""
    from importlib import resources

    folder = resources.files("sklearn.datasets") / "descr"
    texts = [entry.read_text(encoding="utf-8") for entry in sorted(folder.iterdir(), key=lambda e: e.name)
             if entry.name.endswith(".rst")]
    if LICENSES.is_dir():
        texts += [path.read_text(encoding="utf-8", errors="replace") for path in sorted(LICENSES.iterdir())
                  if path.is_file()]
    return _sentences(texts)


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Masked mean over tokens, L2-normalized: the sentence embedding."""
    weights = mask[..., None].astype(np.float64)
    pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
