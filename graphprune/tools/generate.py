"""Greedy generation with a KV-cache decoder in ONNX Runtime.

The model reads `input_ids`, `attention_mask`, optionally `position_ids`, and one past tensor per
cache entry ([batch, kv_heads, past, head_dim]: Optimum's `past_key_values.N.key/value`, the
onnxruntime-genai builder's layout too); it returns `logits` first and the grown caches
(`present.N.key/value`, matched to the pasts by position in `cache_pairs`). The first step feeds
the prompt with empty pasts, every later step the chosen token and the previous step's presents.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from graphprune import runtime
from graphprune.analysis.state import cache_pairs, empty_caches
from graphprune.errors import GraphpruneError
from graphprune.ir.model import Model


class GenerationError(GraphpruneError):
    """The model is not a KV-cache decoder this loop can drive."""


def greedy(model: Model, prompt: np.ndarray, new_tokens: int, threads: int = 2,
           step_seconds: list[float] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Generate `new_tokens` tokens after `prompt` ([batch, length] ids) by argmax; returns the
    tokens [batch, new_tokens] and each step's last-position logits. `step_seconds`: each step's
    ORT run time is appended to it (the first step is the prompt's)."""
    pairs = cache_pairs(model)
    if not pairs:
        raise GenerationError("the model has no KV cache (no past input feeds a present output)")
    proto = model.to_onnx()
    session = runtime.session(proto, threads=threads)
    names = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    for needed in ("input_ids", "attention_mask"):
        if needed not in names:
            raise GenerationError(f"the model has no '{needed}' input")
    inputs = {t.name: t for t in model.graph.inputs}
    batch = prompt.shape[0]
    ids_type, mask_type = inputs["input_ids"].dtype, inputs["attention_mask"].dtype
    past = empty_caches(model, batch, runtime.implied_dims(proto))
    present_of = {q.name: p.name for p, q in pairs}
    tokens = np.asarray(prompt, ids_type)
    length = 0
    chosen, logits_seen = [], []
    for _ in range(new_tokens):
        total = length + tokens.shape[1]
        feeds = {"input_ids": tokens, "attention_mask": np.ones((batch, total), mask_type), **past}
        if "position_ids" in names:
            feeds["position_ids"] = np.broadcast_to(np.arange(length, total, dtype=np.int64), (batch, tokens.shape[1]))
        start = time.perf_counter()
        results = dict(zip(outputs, session.run(None, feeds), strict=True))
        if step_seconds is not None:
            step_seconds.append(time.perf_counter() - start)
        last = results[outputs[0]][:, -1, :]
        logits_seen.append(last)
        step = last.argmax(axis=-1).astype(ids_type)
        chosen.append(step)
        past = {present_of[name]: value for name, value in results.items() if name in present_of}
        length, tokens = total, step[:, None]
    return np.stack(chosen, axis=1), logits_seen


def decode_rate(models: Mapping[str, Model], prompt: np.ndarray, new_tokens: int, rounds: int = 3,
                threads: int = 2) -> dict[str, float]:
    """Tokens per second of the steps after the prompt's (each one token with the cache), from
    their ORT run times; each model in turn, best of `rounds`."""
    best = dict.fromkeys(models, 0.0)
    for _ in range(rounds):
        for name, model in models.items():
            steps: list[float] = []
            greedy(model, prompt, new_tokens, threads, step_seconds=steps)
            best[name] = max(best[name], (len(steps) - 1) / max(sum(steps[1:]), 1e-9))
    return {name: round(rate, 1) for name, rate in best.items()}
