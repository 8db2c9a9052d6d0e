"""Parameter and MAC/FLOP counts per node, from inferred shapes (symbolic dims count as 1)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.ir import Model, shape_of


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int
    flops: int


def _dims(tensor: gs.Tensor) -> list[int] | None:
    shape = shape_of(tensor)
    if shape is None:
        return None
    return [d if isinstance(d, int) and d > 0 else 1 for d in shape]


def _numel(tensor: gs.Tensor) -> int:
    dims = _dims(tensor)
    return int(np.prod(dims, dtype=np.int64)) if dims is not None else 0


def _gemm_macs(node: gs.Node) -> int:
    a = _dims(node.inputs[0])
    if a is None or len(a) != 2:
        return 0
    k = a[0] if node.attrs.get("transA", 0) else a[1]
    return _numel(node.outputs[0]) * k


def _matmul_macs(node: gs.Node) -> int:
    a = _dims(node.inputs[0])
    return _numel(node.outputs[0]) * a[-1] if a else 0


def _conv_macs(node: gs.Node) -> int:
    w = _dims(node.inputs[1])
    if w is None:
        return 0
    # weight is [C_out, C_in / group, *kernel]: each output element reads C_in/group * kernel inputs
    return _numel(node.outputs[0]) * int(np.prod(w[1:], dtype=np.int64))


def _conv_transpose_macs(node: gs.Node) -> int:
    w = _dims(node.inputs[1])
    if w is None:
        return 0
    # weight is [C_in, C_out / group, *kernel]: each input element writes C_out/group * kernel outputs
    return _numel(node.inputs[0]) * int(np.prod(w[1:], dtype=np.int64))


def _attention_macs(node: gs.Node) -> int:
    """com.microsoft Attention projects X [B, S, in] with its packed weight [in, Q + K + V] (the
    score and value products, like those of ONNX Attention, are not counted: their sequence
    lengths are symbolic)."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if node.domain != "com.microsoft" or not isinstance(weight, gs.Constant) or weight.values.ndim != 2:
        return 0
    return _numel(node.inputs[0]) * int(weight.values.shape[1])


#: multiply-accumulate count per op type; ops not listed cost one FLOP per output element.
MACS: dict[str, Callable[[gs.Node], int]] = {
    "Gemm": _gemm_macs,
    "MatMul": _matmul_macs,
    "Conv": _conv_macs,
    "ConvTranspose": _conv_transpose_macs,
    "Attention": _attention_macs,
}

#: ops that only move or relabel data.
FREE_OPS = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Shape",
                      "Cast", "Dropout", "Concat", "Split", "Slice", "Gather", "Expand", "Constant"})


def node_cost(node: gs.Node) -> Cost:
    params = sum(t.values.size for t in node.inputs
                 if isinstance(t, gs.Constant) and np.issubdtype(t.values.dtype, np.floating))
    if node.op in MACS:
        macs = MACS[node.op](node)
        return Cost(int(params), int(macs), int(2 * macs))
    if node.op in FREE_OPS:
        return Cost(int(params), 0, 0)
    return Cost(int(params), 0, sum(_numel(t) for t in node.outputs))


def model_cost(model: Model) -> dict[str, Cost]:
    """Per-node costs keyed by node name; needs inferred shapes."""
    return {node.name or f"{node.op}_{i}": node_cost(node) for i, node in enumerate(model.graph.nodes)}


def totals(model: Model) -> Cost:
    costs = model_cost(model).values()
    return Cost(model.param_count(), sum(c.macs for c in costs), sum(c.flops for c in costs))
