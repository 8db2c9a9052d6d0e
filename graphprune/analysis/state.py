"""A decoder's KV cache: graph inputs and outputs that are state, not a fixed interface.

A cache model reads the keys and values of earlier tokens (`past_key_values.N.key`, ...) and
returns them grown by the new tokens (`present.N.key`, ...); the caller feeds each output back as
the next step's input. Such a pair may lose KV heads like any activation, as long as both sides
lose the same ones: the rules couple them (the attention op, or the Concat that appends the new
keys), and the rewrite sets their declared sizes. Every other graph input and output stays frozen.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.errors import GraphpruneError
from graphprune.ir.model import Model

#: (domain, op) -> (past input index, present output index) pairs of attention ops that keep a cache
CACHE_IO: dict[tuple[str, str], tuple[tuple[int, int], ...]] = {
    ("com.microsoft", "GroupQueryAttention"): ((3, 1), (4, 2)),
    ("com.microsoft", "MultiHeadAttention"): ((6, 1), (7, 2)),
    ("com.microsoft", "Attention"): ((4, 1),),
    ("", "Attention"): ((4, 1), (5, 2)),
}


def _domain(node: gs.Node) -> str:
    return "" if node.domain in (None, "", "ai.onnx") else node.domain


def cache_pairs(model: Model) -> list[tuple[gs.Variable, gs.Variable]]:
    """(past input, present output) pairs: an attention op that reads a graph input as its past and
    writes a graph output as its present, or a Concat that appends to a graph input and whose
    result is a graph output (what the torch exporters make of a DynamicCache)."""
    inputs = {t.name for t in model.graph.inputs}
    outputs = {t.name for t in model.graph.outputs}
    pairs = []
    for node in model.graph.nodes:
        indices = CACHE_IO.get((_domain(node), node.op))
        if node.op == "Concat" and node.outputs[0].name in outputs:
            pasts = [t for t in node.inputs if t.name in inputs]
            if len(pasts) == 1:
                pairs.append((pasts[0], node.outputs[0]))
        for past, present in indices or ():
            if past < len(node.inputs) and present < len(node.outputs) and node.inputs[past].name in inputs \
                    and node.outputs[present].name in outputs:
                pairs.append((node.inputs[past], node.outputs[present]))
    return pairs


def state_tensors(model: Model) -> set[str]:
    """Names of the graph inputs and outputs that are cache state."""
    return {t.name for pair in cache_pairs(model) for t in pair}


def empty_caches(model: Model, batch: int, implied: dict[str, int]) -> dict[str, np.ndarray]:
    """Zero-length pasts for a first step, [batch, heads, 0, head_dim] each; symbolic head sizes
    come from `implied` (`runtime.implied_dims`)."""
    caches = {}
    for past, _ in cache_pairs(model):
        shape = []
        for axis, dim in enumerate(past.shape or ()):
            if axis == 0:
                shape.append(batch)
            elif axis == len(past.shape) - 2:
                shape.append(0)  # the sequence axis
            elif isinstance(dim, int):
                shape.append(dim)
            elif dim in implied:
                shape.append(implied[dim])
            else:
                raise GraphpruneError(f"cache input '{past.name}' axis {axis} is symbolic ('{dim}'): cannot make "
                                      "an empty cache")
        caches[past.name] = np.zeros(shape, past.dtype or np.float32)
    return caches


def fit_empty_inputs(shapes: dict[str, tuple | list | None], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Empty inputs (a KV cache before the first token) reshaped to a model's declared static dims:
    a student's cache may have lost heads that the teacher's still has."""
    fitted = dict(feeds)
    for name, array in feeds.items():
        shape = shapes.get(name)
        if not array.size and shape is not None and len(shape) == array.ndim:
            fitted[name] = np.zeros([d if isinstance(d, int) else n for d, n in zip(shape, array.shape, strict=True)],
                                    array.dtype)
    return fitted
