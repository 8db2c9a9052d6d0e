"""Parameter and MAC/FLOP counts per node, from inferred shapes (symbolic dims count as 1)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.ir.model import Model
from graphprune.ops import spec_of
from graphprune.ops.base import ELEMENTWISE, FREE, numel


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int
    flops: int


def node_cost(node: gs.Node) -> Cost:
    """Parameters, multiply-accumulates and FLOPs of one node, by its registered cost (an op
    without one costs one FLOP per output element)."""
    params = sum(t.values.size for t in node.inputs
                 if isinstance(t, gs.Constant) and np.issubdtype(t.values.dtype, np.floating))
    spec = spec_of(node)
    rule = spec.cost if spec is not None and spec.cost is not None else ELEMENTWISE
    if callable(rule):
        macs = rule(node)
        return Cost(int(params), int(macs), int(2 * macs))
    if rule == FREE:
        return Cost(int(params), 0, 0)
    return Cost(int(params), 0, sum(numel(t) for t in node.outputs))


def model_cost(model: Model) -> dict[str, Cost]:
    """Per-node costs keyed by node name; needs inferred shapes."""
    return {node.name or f"{node.op}_{i}": node_cost(node) for i, node in enumerate(model.graph.nodes)}


def totals(model: Model) -> Cost:
    costs = model_cost(model).values()
    return Cost(model.param_count(), sum(c.macs for c in costs), sum(c.flops for c in costs))
