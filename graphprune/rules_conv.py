"""Dependency rules of convolutional networks: Conv, ConvTranspose, pooling, reductions, norms, Pad, Resize."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.rules import (
    Couplings,
    Rule,
    RuleContext,
    _contraction,
    _input_rank,
    _present,
    _where,
    channel_params,
    freeze_node,
)


def conv(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Y[N, Cout, ...] = Conv(X[N, Cin, ...], W[Cout, Cin/group, k...]) + B[Cout].

    group 1: W's output axis produces channels, its input axis consumes X's channels.
    group > 1 (depthwise, ResNeXt): whole groups are the units, each Cin/group input channels and
    Cout/group output channels and filters, so every group keeps the same size (a virtual slot
    holds the group index; the rewrite sets `group` to the groups kept).
    """
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    if _input_rank(node, ctx, out, minimum=3) is None or ctx.rank(w) is None or ctx.rank(y) is None:
        return
    group = int(node.attrs.get("group", 1))
    out.couple((x.name, 0), (y.name, 0))
    bias = _present(node.inputs[2:3])
    if group == 1:
        out.couple((x.name, 1), (w.name, 1))
        _contraction(node, out, x, w, (x.name, 1))
        out.couple((w.name, 0), (y.name, 1))
        if isinstance(w, gs.Constant):
            out.produced.setdefault((w.name, 0), "channel")
        for b in bias:
            out.couple((b.name, 0), (y.name, 1))
        return
    cin, cout = ctx.dim(x, 1), ctx.dim(y, 1)
    if not isinstance(cin, int) or not isinstance(cout, int) or cin % group or cout % group:
        freeze_node(node, ctx, out, f"{_where(node)}: grouped convolution with unknown channel counts")
        return
    # a unit is one whole group: cin/group input channels, cout/group output channels and filters
    groups = group_slot(node)
    out.virtual[groups] = group
    out.block(groups, (x.name, 1), cin // group)
    for tensor, axis in ((y, 1), (w, 0), *((b, 0) for b in bias)):
        out.block(groups, (tensor.name, axis), cout // group)


def group_slot(node: gs.Node) -> tuple[str, int]:
    """The virtual slot whose units are the groups of a grouped convolution."""
    return (f"{node.outputs[0].name}#groups", 0)


def conv_transpose(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Y = ConvTranspose(X[N, Cin, ...], W[Cin, Cout/group, k...]) + B[Cout]; group 1 only."""
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    if _input_rank(node, ctx, out, minimum=3) is None:
        return
    out.couple((x.name, 0), (y.name, 0))
    if int(node.attrs.get("group", 1)) != 1:
        freeze_node(node, ctx, out, f"{_where(node)}: grouped transposed convolution")
        return
    out.couple((x.name, 1), (w.name, 0))
    _contraction(node, out, x, w, (x.name, 1))
    out.couple((w.name, 1), (y.name, 1))
    if isinstance(w, gs.Constant):
        out.produced.setdefault((w.name, 1), "channel")
    for b in _present(node.inputs[2:3]):
        out.couple((b.name, 0), (y.name, 1))


def pool(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Pooling keeps batch and channel axes; spatial sizes change and are not coupled."""
    x, y = node.inputs[0], node.outputs[0]
    if _input_rank(node, ctx, out, minimum=2) is None:
        return
    out.couple((x.name, 0), (y.name, 0))
    indices = _present(node.outputs[1:])
    if indices:  # the index values encode the channel: removing one would renumber the rest
        out.freeze((x.name, 1), f"{_where(node)}: pooling indices count channels")
        out.freeze((y.name, 1), f"{_where(node)}: pooling indices count channels")
    else:
        out.couple((x.name, 1), (y.name, 1))
    for extra in indices:
        out.freeze_tensor(extra, f"{_where(node)}: pooling indices")


def reduce(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Kept axes map through (dropped ones shift when keepdims=0); a unit reduced away is summed with
    the others, so its removal is not exact."""
    x, y = node.inputs[0], node.outputs[0]
    rank = _input_rank(node, ctx, out)
    if rank is None:
        return
    if len(node.inputs) > 1 and node.inputs[1].name:
        value = ctx.constant(node.inputs[1])
        if value is None:
            freeze_node(node, ctx, out, f"{_where(node)}: axes computed at run time")
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
            out.mark_inexact((x.name, axis), f"{_where(node)} reduces over this axis")
            out_axis += 1 if keepdims else 0
            continue
        out.couple((x.name, axis), (y.name, out_axis))
        out_axis += 1


def instance_norm(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Per-channel statistics over spatial axes: channels are independent, removal is exact."""
    channel_params(node, ctx, out, slice(1, 3))


def group_norm(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """GroupNormalization with one channel per group is InstanceNorm; otherwise channels freeze."""
    x, y = node.inputs[0], node.outputs[0]
    groups = node.attrs.get("num_groups")
    if groups is not None and groups == ctx.dim(x, 1):
        channel_params(node, ctx, out, slice(1, 3))
        return
    if not channel_params(node, ctx, out, slice(0, 0)):
        return
    params = _present(node.inputs[1:3])
    reason = f"{_where(node)}: channels normalized in groups of several"
    out.freeze((y.name, 1), reason)
    for param in params:
        out.freeze_tensor(param, reason)


def _constant_operand(node: gs.Node, ctx: RuleContext, index: int) -> np.ndarray | None:
    if index < len(node.inputs) and node.inputs[index].name:
        return ctx.constant(node.inputs[index])
    return None


def pad(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Unpadded axes map through; padded ones (spatial, as a rule) are not coupled."""
    x, y = node.inputs[0], node.outputs[0]
    rank = _input_rank(node, ctx, out)
    if rank is None:
        return
    pads = node.attrs.get("pads") if ctx.opset < 11 else _constant_operand(node, ctx, 1)
    axes = _constant_operand(node, ctx, 3)
    if pads is None or (len(node.inputs) > 3 and node.inputs[3].name and axes is None):
        freeze_node(node, ctx, out, f"{_where(node)}: pads computed at run time")
        return
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    padded = {axis for i, axis in enumerate(axes) if pads[i] or pads[i + len(axes)]}
    for axis in range(rank):
        if axis in padded:
            out.freeze((x.name, axis), f"{_where(node)} pads this axis")
        else:
            out.couple((x.name, axis), (y.name, axis))


def resize(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Axes Resize leaves at their size map through (its `sizes` are fixed by the rewrite)."""
    x, y = node.inputs[0], node.outputs[0]
    rank = _input_rank(node, ctx, out)
    if rank is None or ctx.rank(y) != rank:
        return
    given = [i for i in (2, 3) if i < len(node.inputs) and node.inputs[i].name]
    if any(ctx.constant(node.inputs[i]) is None for i in given):
        freeze_node(node, ctx, out, f"{_where(node)}: scales/sizes computed at run time")
        return
    if node.attrs.get("axes") is not None:
        freeze_node(node, ctx, out, f"{_where(node)}: resizes a subset of axes (the `axes` attribute)")
        return
    scales = ctx.constant(node.inputs[2]) if 2 in given else None
    sizes = ctx.constant(node.inputs[3]) if 3 in given else None
    for axis in range(rank):
        dim = ctx.dim(x, axis)
        # an axis maps through only when Resize leaves it alone (scale 1, or its own size)
        unchanged = (scales is not None and scales.size == rank and float(scales.reshape(-1)[axis]) == 1.0) or (
            sizes is not None and sizes.size == rank and isinstance(dim, int) and int(sizes.reshape(-1)[axis]) == dim)
        if unchanged:
            out.couple((x.name, axis), (y.name, axis))
        else:
            out.freeze((x.name, axis), f"{_where(node)} resizes this axis")


POOL_OPS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
REDUCE_OPS = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp")

CONV_RULES: dict[str, Rule] = {
    "Conv": conv,
    "ConvTranspose": conv_transpose,
    **{op: pool for op in POOL_OPS},
    **{op: reduce for op in REDUCE_OPS},
    "InstanceNormalization": instance_norm,
    "GroupNormalization": group_norm,
    "Pad": pad,
    "Resize": resize,
}
