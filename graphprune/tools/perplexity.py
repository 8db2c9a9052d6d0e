"""Perplexity of a causal language model from its ONNX logits, in ONNX Runtime.

Protocol (`token_windows` + `perplexity`): the text is tokenized as one stream (no special
tokens) and cut into non-overlapping windows of `window` tokens (stride = window, the last partial
window dropped). Each window is run alone, from an empty cache where the model has one; every token
after a window's first is predicted from the tokens before it in that window, so a window of 256
scores 255 tokens. Perplexity = exp(mean negative log-likelihood over all scored tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from graphprune import runtime
from graphprune.analysis.state import empty_caches
from graphprune.errors import GraphpruneError
from graphprune.ir.model import Model


class PerplexityError(GraphpruneError):
    """The model or the text cannot give a perplexity."""


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    windows: int
    window: int

    def to_json(self) -> dict:
        return {"perplexity": round(self.perplexity, 4), "nll": round(self.nll, 6), "tokens": self.tokens,
                "windows": self.windows, "window": self.window}


def token_windows(ids: list[int] | np.ndarray, window: int, limit: int | None = None) -> np.ndarray:
    """[n, window] non-overlapping windows of a token stream (the last partial one dropped)."""
    if window < 2:
        raise PerplexityError(f"a window must hold at least 2 tokens, got {window}")
    ids = np.asarray(ids, np.int64)
    count = len(ids) // window
    if limit is not None:
        count = min(count, limit)
    if count == 0:
        raise PerplexityError(f"the text has {len(ids)} tokens: fewer than one window of {window}")
    return ids[:count * window].reshape(count, window)


def text_windows(text: str, tokenizer, window: int, limit: int | None = None) -> np.ndarray:
    """Token windows of `text` with a Hugging Face tokenizer."""
    return token_windows(tokenizer(text, add_special_tokens=False)["input_ids"], window, limit)


def causal_feeds(model: Model, ids: np.ndarray, implied: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Inputs for a batch of token windows: ids, an all-ones mask, positions and empty caches where
    the model takes them (`implied`: the cache's symbolic sizes, `runtime.implied_dims`, found here
    when not given)."""
    if implied is None:
        implied = runtime.implied_dims(model.to_onnx())
    names = {t.name: t for t in model.graph.inputs}
    if "input_ids" not in names:
        raise PerplexityError("the model has no 'input_ids' input")
    batch, length = ids.shape
    feeds = empty_caches(model, batch, implied)
    for name, tensor in names.items():
        if name == "input_ids":
            feeds[name] = ids.astype(tensor.dtype)
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, length), tensor.dtype)
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(length, dtype=tensor.dtype), (batch, length)).copy()
    missing = sorted(set(names) - set(feeds))
    if missing:
        raise PerplexityError(f"cannot feed input '{missing[0]}' of a causal LM (input_ids, attention_mask, "
                              "position_ids and a KV cache are known)")
    return feeds


def perplexity(model: Model, windows: np.ndarray, threads: int = 2,
               progress: Callable[[int, int], None] | None = None,
               providers: list[str] | None = None) -> Perplexity:
    """Perplexity of `model` over token `windows` [n, length] (see the module doc), on ORT's
    `providers` (default: the CPU)."""
    proto = model.to_onnx()
    implied = runtime.implied_dims(proto)
    session = runtime.session(proto, threads=threads, providers=providers)
    outputs = [o.name for o in session.get_outputs()]
    logits_name = "logits" if "logits" in outputs else outputs[0]
    total, scored = 0.0, 0
    for index, window in enumerate(windows):
        feeds = causal_feeds(model, window[None, :], implied)
        logits, = session.run([logits_name], feeds)
        if logits.ndim != 3 or logits.shape[1] != window.shape[0]:
            raise PerplexityError(f"output '{logits_name}' has shape {list(logits.shape)}: [batch, "
                                  f"{window.shape[0]}, vocabulary] logits expected")
        scores = logits[0, :-1].astype(np.float64)
        top = scores.max(axis=-1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(scores - top).sum(axis=-1))
        total += float(np.sum(log_norm - scores[np.arange(len(scores)), window[1:]]))
        scored += len(scores)
        if progress:
            progress(index + 1, len(windows))
    nll = total / scored
    return Perplexity(math.exp(nll), nll, scored, len(windows), int(windows.shape[1]))
