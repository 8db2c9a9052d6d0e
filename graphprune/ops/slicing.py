"""Ops that cut or join along an axis: Concat, Split, Slice, Gather (and GatherElements / GatherND,
lowered only)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.ops.base import (
    ELEMENTWISE,
    FREE,
    Couplings,
    LoweringError,
    RewriteContext,
    RuleContext,
    freeze_node,
    input_rank,
    int_list,
    is_touched,
    node_label,
    old_dim,
    present_tensors,
    torch,
)
from graphprune.ops.registry import register


def _same_except(out: Couplings, a: gs.Tensor, b: gs.Tensor, rank: int, axis: int) -> None:
    for other in range(rank):
        if other != axis:
            out.couple((a.name, other), (b.name, other))


def _lay_end_to_end(node: gs.Node, ctx: RuleContext, out: Couplings, parts: list[gs.Tensor], whole: gs.Tensor,
                    rank: int, axis: int) -> None:
    """`parts` lie one after another along `axis` of `whole` (Concat inputs, Split outputs)."""
    for part in parts:
        _same_except(out, part, whole, rank, axis)
    if len(parts) == 1:
        out.couple((parts[0].name, axis), (whole.name, axis))
        return
    start = 0
    for part in parts:
        size = ctx.dim(part, axis)
        if not isinstance(size, int):
            reason = f"{node_label(node)}: '{part.name}' has unknown size on axis {axis}"
            for tensor in parts + [whole]:
                out.freeze((tensor.name, axis), reason)
            return
        out.offset((part.name, axis), (whole.name, axis), start)
        start += size


def concat(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    y = node.outputs[0]
    rank = ctx.rank(y)
    if rank is None:
        freeze_node(node, ctx, out, f"{node_label(node)}: unknown output rank")
        return
    _lay_end_to_end(node, ctx, out, present_tensors(node.inputs), y, rank, node.attrs["axis"] % rank)


def split(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    rank = input_rank(node, ctx, out)
    if rank is None:
        return
    _lay_end_to_end(node, ctx, out, list(node.outputs), node.inputs[0], rank, node.attrs.get("axis", 0) % rank)


def slice_start(start: int, size: int) -> int:
    """A Slice start clamped into [0, size] as ONNX defines it (negative counts from the end)."""
    return min(max(start + size if start < 0 else start, 0), size)


def slice_rule(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Unsliced axes couple; a sliced axis with constant bounds and step 1 is an offset into the
    input; any other sliced axis (run-time bounds, strides) is frozen."""
    x, y = node.inputs[0], node.outputs[0]
    rank = ctx.rank(x)
    operands = list(node.inputs[1:5]) + [None] * (5 - len(node.inputs))
    given = [t is not None and bool(t.name) for t in operands]
    bounds = [ctx.constant(t) if present else None for t, present in zip(operands, given, strict=True)]
    axes_value = bounds[2] if given[2] else None
    if rank is None or (given[2] and axes_value is None) or not (given[0] and given[1]):
        freeze_node(node, ctx, out, f"{node_label(node)}: slice axes are not constants")
        return
    count = ctx.dim(node.inputs[1], 0) if bounds[0] is None else len(bounds[0])
    if axes_value is not None:
        axes = [int(a) % rank for a in axes_value]
    elif isinstance(count, int):
        axes = list(range(count))
    else:
        freeze_node(node, ctx, out, f"{node_label(node)}: cannot tell which axes are sliced")
        return
    constant = all(b is not None for b, present in zip(bounds, given, strict=True) if present)
    starts = bounds[0]
    steps = [1] * len(axes) if bounds[3] is None else [int(s) for s in bounds[3]]
    for axis in range(rank):
        if axis not in axes:
            out.couple((x.name, axis), (y.name, axis))
            continue
        i = axes.index(axis)
        size = ctx.dim(x, axis)
        if not constant or starts is None or steps[i] != 1 or not isinstance(size, int) \
                or not isinstance(ctx.dim(y, axis), int):
            reason = f"{node_label(node)}: strided, run-time or unknown-size slice on axis {axis}"
            out.freeze((x.name, axis), reason)
            out.freeze((y.name, axis), reason)
            continue
        out.offset((y.name, axis), (x.name, axis), slice_start(int(starts[i]), size))


def gather(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Y = data indexed along `axis` by `indices`: data's other axes and the indices' axes carry
    over to Y (an embedding's feature axis is the hidden size); the indexed axis is frozen."""
    data, indices, y = node.inputs[0], node.inputs[1], node.outputs[0]
    rank_d, rank_i = ctx.rank(data), ctx.rank(indices)
    if rank_d is None or rank_i is None:
        freeze_node(node, ctx, out, f"{node_label(node)}: unknown ranks")
        return
    axis = node.attrs.get("axis", 0) % rank_d
    for a in range(axis):
        out.couple((data.name, a), (y.name, a))
    for a in range(rank_i):
        out.couple((indices.name, a), (y.name, axis + a))
    for a in range(axis + 1, rank_d):
        out.couple((data.name, a), (y.name, a - 1 + rank_i))


def fix_split(node: gs.Node, ctx: RewriteContext) -> None:
    x = node.inputs[0]
    if not is_touched(x, ctx):
        return
    axis = node.attrs.get("axis", 0) % len(x.shape)
    if ctx.kept_of(x, axis) is None:
        return
    sizes = np.array([ctx.size_of(y, axis, old_dim(y, axis)) for y in node.outputs], dtype=np.int64)
    if ctx.model.graph.opset < 13:
        node.attrs["split"] = [int(s) for s in sizes]
        return
    node.attrs.pop("num_outputs", None)
    split_input = ctx.constant(f"{node.name}_split", sizes)
    if len(node.inputs) > 1:
        node.inputs[1] = split_input
    else:
        node.inputs.append(split_input)


def fix_slice(node: gs.Node, ctx: RewriteContext) -> None:
    x, y = node.inputs[0], node.outputs[0]
    if not is_touched(x, ctx) or not all(isinstance(t, gs.Constant) for t in node.inputs[1:] if t.name):
        return  # a pruned sliced axis has constant bounds (the rule froze any other)
    rank = len(x.shape)
    index_type = np.asarray(node.inputs[1].values).dtype  # int32 or int64, shared with axes/steps
    starts = np.array(node.inputs[1].values, dtype=np.int64).copy()
    ends = np.array(node.inputs[2].values, dtype=np.int64).copy()
    has_axes = len(node.inputs) > 3 and node.inputs[3].name
    axes = [int(a) % rank for a in node.inputs[3].values] if has_axes else list(range(len(starts)))
    changed = False
    for i, axis in enumerate(axes):
        kept = ctx.kept_of(x, axis)
        if kept is None:
            continue
        size = old_dim(x, axis)
        start = slice_start(int(starts[i]), size)
        new_start = int(np.count_nonzero(kept < start))
        starts[i] = new_start
        ends[i] = new_start + ctx.size_of(y, axis, old_dim(y, axis))
        changed = True
    if changed:
        node.inputs[1] = ctx.constant(f"{node.name}_starts", starts.astype(index_type))
        node.inputs[2] = ctx.constant(f"{node.name}_ends", ends.astype(index_type))


def lower_concat(*xs, axis):
    return torch.cat(xs, dim=axis)


def lower_split(x, split=None, axis=0, num_outputs=None, outputs=1, split_attr=None):
    sizes = int_list(split) if split is not None else split_attr
    if sizes is None:
        count = num_outputs or outputs
        size = x.shape[axis]
        chunk = -(-size // count)
        sizes = [min(chunk, size - i * chunk) for i in range(count)]
    return tuple(torch.split(x, sizes, dim=axis))


def lower_slice(x, starts, ends, axes=None, steps=None):
    starts, ends = int_list(starts), int_list(ends)
    axes = int_list(axes) if axes is not None else list(range(len(starts)))
    steps = int_list(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis %= x.dim()
        size = x.shape[axis]
        if step > 0:
            start = min(max(start + size if start < 0 else start, 0), size)
            end = min(max(end + size if end < 0 else end, 0), size)
            index[axis] = slice(start, max(start, end), step)
        else:  # torch has no negative steps: slice the mirrored range, then flip
            start = min(max(start + size if start < 0 else start, -1), size - 1)
            end = min(max(end + size if end < 0 else end, -1), size - 1)
            count = max(0, -(-(start - end) // -step))
            first = start - (count - 1) * -step if count else 0
            index[axis] = slice(first, first + (count - 1) * -step + 1 if count else 0, -step)
            flips.append(axis)
    y = x[tuple(index)]
    return torch.flip(y, flips) if flips else y


def lower_gather(x, indices, axis=0):
    axis %= x.dim()
    idx = torch.where(indices < 0, indices + x.shape[axis], indices)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape(list(x.shape[:axis]) + list(indices.shape) + list(x.shape[axis + 1:]))


def lower_gather_elements(x, indices, axis=0):
    axis %= x.dim()
    return torch.gather(x, axis, torch.where(indices < 0, indices + x.shape[axis], indices))


def lower_gather_nd(x, indices, batch_dims=0):
    if batch_dims:
        raise LoweringError("GatherND with batch_dims > 0 is not supported")
    depth = indices.shape[-1]
    flat = indices.reshape(-1, depth)
    picked = x[tuple(flat[:, i] for i in range(depth))]
    return picked.reshape(list(indices.shape[:-1]) + list(x.shape[depth:]))


def _split_attributes(node: gs.Node, attributes: dict, opset: int) -> None:
    """Split sizes were an attribute before opset 13 (an input since); the output count is needed."""
    if "split" in attributes:
        attributes["split_attr"] = attributes.pop("split")
    attributes["outputs"] = len(node.outputs)


register("Concat", rule=concat, lowering=lower_concat, cost=FREE)
register("Split", rule=split, fixup=fix_split, lowering=lower_split, cost=FREE, multi_output=True,
         attributes=_split_attributes)
register("Slice", rule=slice_rule, fixup=fix_slice, lowering=lower_slice, cost=FREE)
register("Gather", rule=gather, lowering=lower_gather, cost=FREE)
register("GatherElements", lowering=lower_gather_elements, cost=ELEMENTWISE)
register("GatherND", lowering=lower_gather_nd, cost=ELEMENTWISE)
