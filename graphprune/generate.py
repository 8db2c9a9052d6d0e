"""Greedy generation with a KV-cache decoder in ONNX Runtime.

The model reads `input_ids`, `attention_mask`, optionally `position_ids`, and one past tensor per
cache entry ([batch, kv_heads, past, head_dim]: Optimum's `past_key_values.N.key/value`, the
onnxruntime-genai builder's layout too); it returns `logits` first and the grown caches
(`present.N.key/value`, matched to the pasts by position in `cache_pairs`). The first step feeds
the prompt with empty pasts, every later step the chosen token and the previous step's presents.
"""

from __future__ import annotations

import numpy as np
import onnx

from graphprune import runtime
from graphprune.errors import GraphpruneError
from graphprune.ir import Model
from graphprune.state import cache_pairs


class GenerationError(GraphpruneError):
    """The model is not a KV-cache decoder this loop can drive."""


def _past_shape(value: onnx.ValueInfoProto, batch: int, implied: dict[str, int]) -> list[int]:
    dims = value.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise GenerationError(f"cache input '{value.name}' has rank {len(dims)}; [batch, heads, seq, dim] expected")
    shape = []
    for axis, dim in enumerate(dims):
        if axis == 0:
            shape.append(batch)
        elif axis == 2:
            shape.append(0)
        elif dim.HasField("dim_value"):
            shape.append(dim.dim_value)
        elif dim.dim_param in implied:
            shape.append(implied[dim.dim_param])
        else:
            raise GenerationError(f"cache input '{value.name}' axis {axis} is symbolic ('{dim.dim_param}')")
    return shape


def greedy(model: Model, prompt: np.ndarray, new_tokens: int, threads: int = 2,
           ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Generate `new_tokens` tokens after `prompt` ([batch, length] ids) by argmax; returns the
    tokens [batch, new_tokens] and each step's last-position logits."""
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
    values = {v.name: v for v in proto.graph.input}
    implied = runtime.implied_dims(proto)
    batch = prompt.shape[0]
    ids_type = onnx.helper.tensor_dtype_to_np_dtype(values["input_ids"].type.tensor_type.elem_type)
    mask_type = onnx.helper.tensor_dtype_to_np_dtype(values["attention_mask"].type.tensor_type.elem_type)
    past = {p.name: np.zeros(_past_shape(values[p.name], batch, implied), np.float32) for p, _ in pairs}
    present_of = {q.name: p.name for p, q in pairs}
    tokens = np.asarray(prompt, ids_type)
    length = 0
    chosen, logits_seen = [], []
    for _ in range(new_tokens):
        total = length + tokens.shape[1]
        feeds = {"input_ids": tokens, "attention_mask": np.ones((batch, total), mask_type), **past}
        if "position_ids" in names:
            feeds["position_ids"] = np.broadcast_to(np.arange(length, total, dtype=np.int64), (batch, tokens.shape[1]))
        results = dict(zip(outputs, session.run(None, feeds), strict=True))
        last = results[outputs[0]][:, -1, :]
        logits_seen.append(last)
        step = last.argmax(axis=-1).astype(ids_type)
        chosen.append(step)
        past = {present_of[name]: value for name, value in results.items() if name in present_of}
        length, tokens = total, step[:, None]
    return np.stack(chosen, axis=1), logits_seen
