"""Reductions (ReduceMean, ReduceSum, ... over axes given as an input or an attribute) and CumSum."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from graphprune.ops.base import (
    ELEMENTWISE,
    Couplings,
    RuleContext,
    freeze_node,
    input_rank,
    int_list,
    node_label,
    torch,
)
from graphprune.ops.registry import register

REDUCE_OPS = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp")


def reduce(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Kept axes map through (dropped ones shift when keepdims=0); a unit reduced away is summed with
    the others, so its removal is not exact."""
    x, y = node.inputs[0], node.outputs[0]
    rank = input_rank(node, ctx, out)
    if rank is None:
        return
    if len(node.inputs) > 1 and node.inputs[1].name:
        value = ctx.constant(node.inputs[1])
        if value is None:
            freeze_node(node, ctx, out, f"{node_label(node)}: axes computed at run time")
            return
        axes = [int(a) for a in value.reshape(-1)]
    else:
        axes = [int(a) for a in node.attrs.get("axes", [])]
    if not axes:
        axes = [] if node.attrs.get("noop_with_empty_axes", 0) else list(range(rank))
    reduced = {a % rank for a in axes}
    if node.op == "ReduceMean" and reduced == {rank - 1} and rank >= 3:
        out.produced[(x.name, rank - 1)] = "hidden"  # RMSNorm's mean of squares over the features
    keepdims = node.attrs.get("keepdims", 1)
    out_axis = 0
    for axis in range(rank):
        if axis in reduced:
            out.mark_inexact((x.name, axis), f"{node_label(node)} reduces over this axis")
            out_axis += 1 if keepdims else 0
            continue
        out.couple((x.name, axis), (y.name, out_axis))
        out_axis += 1


def lower_reduce(x, axes_input=None, op="ReduceSum", axes=None, keepdims=1, noop_with_empty_axes=0):
    axes = int_list(axes_input) if axes_input is not None else axes
    if not axes:
        if noop_with_empty_axes:
            return x
        axes = list(range(x.dim()))
    dims = tuple(a % x.dim() for a in axes)
    keep = bool(keepdims)
    if op == "ReduceMean":
        return x.mean(dim=dims, keepdim=keep)
    if op == "ReduceSum":
        return x.sum(dim=dims, keepdim=keep)
    if op == "ReduceMax":
        return x.amax(dim=dims, keepdim=keep)
    if op == "ReduceMin":
        return x.amin(dim=dims, keepdim=keep)
    if op == "ReduceProd":
        for d in sorted(dims, reverse=True):
            x = x.prod(dim=d, keepdim=keep)
        return x
    if op == "ReduceL1":
        return x.abs().sum(dim=dims, keepdim=keep)
    if op == "ReduceL2":
        return x.pow(2).sum(dim=dims, keepdim=keep).sqrt()
    if op == "ReduceSumSquare":
        return x.pow(2).sum(dim=dims, keepdim=keep)
    if op == "ReduceLogSum":
        return x.sum(dim=dims, keepdim=keep).log()
    return torch.logsumexp(x, dim=dims, keepdim=keep)


def lower_cumsum(x, axis, exclusive=0, reverse=0):
    dim = int(axis.item())
    y = torch.flip(x, [dim]) if reverse else x
    y = torch.cumsum(y, dim)
    if exclusive:
        y = y - (torch.flip(x, [dim]) if reverse else x)
    return torch.flip(y, [dim]) if reverse else y


def _reduce_op(node: gs.Node, attributes: dict, opset: int) -> None:
    attributes["op"] = node.op


for _op in REDUCE_OPS:
    register(_op, rule=reduce, lowering=lower_reduce, cost=ELEMENTWISE, keyword_inputs={1: "axes_input"},
             attributes=_reduce_op, tags={"reduce"})
register("CumSum", lowering=lower_cumsum, cost=ELEMENTWISE)
