"""Ops that move or regroup axes: Transpose, Squeeze, Unsqueeze, Flatten, Reshape, Expand and
Shape; with the tensor makers Range, ConstantOfShape and Tile (lowered only).

Axes are matched as products of factors (`match_axes`; symbolic dims such as `batch*seq` too).
A run of axes merged into one axis, or one axis split into several, is a `Factor` relation: the
product is made of its parts, outermost first. A run that both merges and splits ([batch, E] ->
[batch*heads, head_dim]) is first cut into the common factors of both sides (`common_factors`),
with a virtual slot for a factor no single axis holds. Which part's units the product follows is
decided over the whole graph (`deps.resolve_factors`); the other parts are frozen there. Literal
sizes of Reshape/Expand targets, constant or computed by Shape -> Concat chains
(`graphprune.analysis.shapes`), are recomputed by the rewrite (`fix_target`).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.analysis.shapes import DimOf, Entry, Lit, Opaque, Path, Product, Scaled, shape_value, sources
from graphprune.ops.base import (
    ELEMENTWISE,
    FREE,
    Couplings,
    Dim,
    RewriteContext,
    RuleContext,
    ScaledSize,
    Slot,
    freeze_node,
    input_rank,
    int_list,
    is_touched,
    node_label,
    torch,
    torch_dtype,
)
from graphprune.ops.registry import register


def transpose(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    x, y = node.inputs[0], node.outputs[0]
    rank = input_rank(node, ctx, out)
    if rank is None:
        return
    perm = node.attrs.get("perm", list(reversed(range(rank))))
    for out_axis, in_axis in enumerate(perm):
        out.couple((x.name, int(in_axis)), (y.name, out_axis))


def _axes_operand(node: gs.Node, ctx: RuleContext) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1].name:
        value = ctx.constant(node.inputs[1])
        return None if value is None else [int(a) for a in value.reshape(-1)]
    axes = node.attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


def unsqueeze(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    x, y = node.inputs[0], node.outputs[0]
    rank_x, rank_y, axes = ctx.rank(x), ctx.rank(y), _axes_operand(node, ctx)
    if rank_x is None or rank_y is None or axes is None:
        freeze_node(node, ctx, out, f"{node_label(node)}: axes or ranks unknown")
        return
    inserted = {a % rank_y for a in axes}
    kept = [a for a in range(rank_y) if a not in inserted]
    for in_axis, out_axis in enumerate(kept):
        out.couple((x.name, in_axis), (y.name, out_axis))


def squeeze(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    x, y = node.inputs[0], node.outputs[0]
    shape, axes = ctx.shape(x), _axes_operand(node, ctx)
    if shape is None:
        freeze_node(node, ctx, out, f"{node_label(node)}: unknown input rank")
        return
    if axes is None:
        if any(not isinstance(d, int) for d in shape):
            freeze_node(node, ctx, out, f"{node_label(node)}: squeezes unknown dims")
            return
        axes = [a for a, d in enumerate(shape) if d == 1]
    removed = {a % len(shape) for a in axes}
    kept = [a for a in range(len(shape)) if a not in removed]
    for out_axis, in_axis in enumerate(kept):
        out.couple((x.name, in_axis), (y.name, out_axis))


def _couple_runs(node: gs.Node, out: Couplings, x: gs.Tensor, y: gs.Tensor, in_axes: list[int],
                 out_axes: list[int], in_shape: list[Dim], out_shape: list[Dim]) -> None:
    """Couple one matched run: in_axes of x hold the same elements as out_axes of y. A merge or a
    split is a `Factor` (which part is the unit is decided over the whole graph); a run that does
    both ([batch, E] -> [batch*heads, head_dim]) is cut into common factors first."""
    ins = [a for a in in_axes if in_shape[a] != 1]
    outs = [a for a in out_axes if out_shape[a] != 1]
    if not ins and not outs:
        return
    if len(ins) == 1 and len(outs) == 1:
        out.couple((x.name, ins[0]), (y.name, outs[0]))
        return
    reason = f"{node_label(node)} merges or splits this axis with others"
    if len(outs) == 1:
        out.factor((y.name, outs[0]), [(x.name, a) for a in ins], [in_shape[a] for a in ins], reason)
        return
    if len(ins) == 1:
        out.factor((x.name, ins[0]), [(y.name, a) for a in outs], [out_shape[a] for a in outs], reason)
        if outs[-1] == len(out_shape) - 1 and ins[0] == len(in_shape) - 1:
            # [.., H*D] -> [.., H, D] (or [.., 3, H, D], packed QKV): units of D features
            out.produced.update({(y.name, a): "head" for a in outs[:-1]})
        return
    atoms = common_factors([in_shape[a] for a in ins], [out_shape[a] for a in outs])
    if atoms is None:
        for axis in ins:
            out.freeze((x.name, axis), reason)
        for axis in outs:
            out.freeze((y.name, axis), reason)
        return
    sizes, in_atoms, out_atoms = atoms
    # each common factor is represented by an axis that is that factor alone, else by a virtual slot
    single: dict[int, Slot] = {}
    for tensor, axes, groups in ((x, ins, in_atoms), (y, outs, out_atoms)):
        for axis, group in zip(axes, groups, strict=True):
            if len(group) == 1:
                if group[0] in single:
                    out.couple(single[group[0]], (tensor.name, axis))
                else:
                    single[group[0]] = (tensor.name, axis)
    slots = []
    for index, size in enumerate(sizes):
        if index not in single:
            single[index] = (f"{y.name}::factor", index)
            out.virtual[single[index]] = size
        slots.append(single[index])
    for tensor, axes, groups in ((x, ins, in_atoms), (y, outs, out_atoms)):
        for axis, group in zip(axes, groups, strict=True):
            if len(group) > 1:
                out.factor((tensor.name, axis), [slots[i] for i in group], [sizes[i] for i in group], reason)
    if ins[-1] == len(in_shape) - 1 and outs[-1] == len(out_shape) - 1 and len(in_atoms[-1]) > 1 \
            and out_atoms[-1] == in_atoms[-1][-1:]:
        out.produced[slots[in_atoms[-1][0]]] = "head"  # [.., B, H*D] -> [.., B*H, D]: units of D features


def common_factors(a: list[Dim], b: list[Dim]) -> tuple[list[Dim], list[list[int]], list[list[int]]] | None:
    """The coarsest factors both lists of dims (with equal products) are made of, left to right:
    [batch, 64] and [batch*4, 16] give [batch, 4, 16], with axes [[0], [1, 2]] and [[0, 1], [2]].
    None when some dims cannot be cut at a common boundary ([4, 6] against [6, 4])."""
    left, right = _products(a), _products(b)
    if left is None or right is None:
        return None
    sizes: list[Dim] = []
    groups_a: list[list[int]] = [[] for _ in a]
    groups_b: list[list[int]] = [[] for _ in b]
    i = j = 0
    one = Product(1)
    while i < len(left) and j < len(right):
        p, q = left[i], right[j]
        if p == q:
            atom = p
        elif q.divide(p) is not None:
            atom = p
        elif p.divide(q) is not None:
            atom = q
        else:
            return None
        groups_a[i].append(len(sizes))
        groups_b[j].append(len(sizes))
        sizes.append(atom.dim)
        rest_p, rest_q = p.divide(atom), q.divide(atom)
        if rest_p is None or rest_q is None:  # p == q == 0: a zero-size run
            raise ValueError(f"cannot cut zero-size dims {a} and {b} into common factors")
        left[i], right[j] = rest_p, rest_q
        if left[i] == one:
            i += 1
        if right[j] == one:
            j += 1
    if i != len(left) or j != len(right):
        return None
    return sizes, groups_a, groups_b


def _products(dims: list[Dim]) -> list[Product] | None:
    """Each dim as a `Product`; None when one is unknown."""
    products = [Product.of(d) for d in dims]
    known = [p for p in products if p is not None]
    return known if len(known) == len(products) else None


def match_axes(in_shape: list[Dim], out_shape: list[Dim]) -> list[tuple[list[int], list[int]]] | None:
    """Runs of axes with equal products, left to right. Dims may be symbolic (`batch`, `unk__3*4`):
    a run grows on the side whose product divides the other's until both agree.

    Returns None when the shapes cannot be matched (an unknown dim, or products that never agree).
    """
    ins, outs = _products(in_shape), _products(out_shape)
    if ins is None or outs is None:
        return None
    runs, i, j = [], 0, 0
    while i < len(ins) or j < len(outs):
        if i == len(ins) or j == len(outs):
            rest_in, rest_out = list(range(i, len(ins))), list(range(j, len(outs)))
            if all(ins[a].dim == 1 for a in rest_in) and all(outs[a].dim == 1 for a in rest_out):
                runs.append((rest_in, rest_out))
                return runs
            return None
        run_in, run_out, product_in, product_out = [i], [j], ins[i], outs[j]
        i, j = i + 1, j + 1
        while product_in != product_out:
            if product_out.divide(product_in) is not None and i < len(ins):
                product_in = product_in * ins[i]
                run_in.append(i)
                i += 1
            elif product_in.divide(product_out) is not None and j < len(outs):
                product_out = product_out * outs[j]
                run_out.append(j)
                j += 1
            else:
                return None
        runs.append((run_in, run_out))
    return runs


def _regroup(node: gs.Node, ctx: RuleContext, out: Couplings, out_shape: list[Dim] | None) -> None:
    x, y = node.inputs[0], node.outputs[0]
    in_shape = ctx.shape(x)
    runs = None if in_shape is None or out_shape is None else match_axes(in_shape, out_shape)
    if in_shape is None or out_shape is None or runs is None:
        freeze_node(node, ctx, out, f"{node_label(node)}: cannot match input and output axes")
        return
    for ins, outs in runs:
        _couple_runs(node, out, x, y, ins, outs, in_shape, out_shape)


def flatten(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    _regroup(node, ctx, out, ctx.shape(node.outputs[0]))


def _path(lit: Lit) -> Path:
    """The path of a literal the rewrite can change."""
    assert lit.path is not None, "only literals with a path are keyed or edited"
    return lit.path


def _literal_key(lit: Lit) -> tuple:
    return tuple((id(n), i) for n, i in _path(lit)), lit.index


def _target_entries(node: gs.Node, ctx: RuleContext, out: Couplings, y: gs.Tensor) -> list[Entry] | None:
    """The target's entries. A size that follows another tensor at run time keeps that tensor's axis
    coupled with this output axis; a size computed by arithmetic, or a literal the rewrite cannot
    reach, freezes its axis (and the sizes it was computed from)."""
    entries = shape_value(node.inputs[1])
    if entries is None:
        freeze_node(node, ctx, out, f"{node_label(node)}: cannot read the target shape")
        return None
    lead = (ctx.rank(y) or len(entries)) - len(entries)
    # one literal read at several positions (Gather with repeated indices, a broadcast Where value)
    # cannot take two new sizes: freeze those positions
    seen = Counter(_literal_key(e) for e in entries if isinstance(e, Lit) and e.path is not None)
    for position, entry in enumerate(entries):
        slot = (y.name, position + lead)
        if isinstance(entry, Lit) and entry.path is not None and seen[_literal_key(entry)] > 1:
            out.freeze(slot, f"{node_label(node)}: one literal gives several sizes")
        if isinstance(entry, DimOf):
            out.couple((entry.tensor, entry.axis), slot)
        elif isinstance(entry, Scaled) and entry.literal is not None and entry.literal.path is not None:
            out.scaled.append(ScaledSize((entry.dim.tensor, entry.dim.axis), slot, entry.factor))
            out.touched.add(slot)
        elif isinstance(entry, Scaled):
            out.block((entry.dim.tensor, entry.dim.axis), slot, entry.factor)
        elif isinstance(entry, Opaque):
            reason = f"{node_label(node)}: size computed at run time"
            out.freeze(slot, reason)
            for source in entry.sources:
                out.freeze((source.tensor, source.axis), reason)
        elif entry.path is None and entry.value not in (-1, 0, 1):
            out.freeze(slot, f"{node_label(node)}: literal size the rewrite cannot reach")
    return entries


def _shape_uses(tensor: gs.Tensor, graph_outputs: frozenset[str]):
    """(consumer, tensor read) for every use of a shape tensor outside shape arithmetic; chains of
    Gather/Concat/Unsqueeze/arithmetic are followed. A Reshape/Expand target is such a use; so is
    a graph output (consumer None)."""
    seen, stack = set(), [tensor]
    while stack:
        current = stack.pop()
        if current.name in seen:
            continue
        seen.add(current.name)
        if current.name in graph_outputs:
            yield None, current
        for consumer in current.outputs:
            first = bool(consumer.inputs) and consumer.inputs[0] is current
            if consumer.op in SHAPE_COMBINE or (consumer.op in SHAPE_SELECT and first):
                stack.extend(consumer.outputs)
            elif consumer.op != "Shape":  # the length of a shape vector says nothing about sizes
                yield consumer, current


#: ops that compute shape vectors from any of their inputs, and ones that do from their first only
SHAPE_COMBINE = frozenset({"Concat", "Add", "Sub", "Mul", "Div", "Mod", "Max", "Min", "Equal", "Where"})


SHAPE_SELECT = frozenset({"Gather", "Slice", "Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape"})


def shape_rule(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Reading a size constrains nothing by itself. Where the size goes decides: a Reshape/Expand
    target couples or freezes it (see `_target_entries`); any other use (Range, ConstantOfShape,
    a graph output...) turns it into data, so that axis is frozen."""
    x = node.inputs[0]
    rank = ctx.rank(x)
    if rank is None:
        freeze_node(node, ctx, out, f"{node_label(node)}: unknown input rank")
        return
    start, end = (max(0, min(rank, v + rank if v < 0 else v))
                  for v in (node.attrs.get("start", 0), node.attrs.get("end", rank)))
    read = range(start, end)
    out.touched.update((x.name, axis) for axis in range(rank))  # axes not read are not constrained
    for consumer, tensor in _shape_uses(node.outputs[0], ctx.graph_outputs):
        target = consumer is not None and consumer.op in ("Reshape", "Expand") and len(consumer.inputs) > 1 and consumer.inputs[1] is tensor
        if target and shape_value(tensor) is not None:
            continue  # the target's rule couples or freezes each size it reads
        values = None if target else shape_value(tensor)
        used = read if values is None else sorted({d.axis for e in values for d in sources(e) if d.tensor == x.name})
        for axis in used:
            user = node_label(consumer) if consumer is not None else f"graph output '{tensor.name}'"
            out.freeze((x.name, axis), f"the size of axis {axis} is used as data by {user}")


def reshape(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Literal sizes of the target (constant or built by a Shape -> Concat chain) are rewritten after
    pruning; sizes read from other tensors at run time follow them."""
    x, y = node.inputs[0], node.outputs[0]
    entries = _target_entries(node, ctx, out, y)
    if entries is None:
        return
    out_shape = ctx.shape(y)
    if out_shape is not None and node.attrs.get("allowzero", 0) == 0:
        # a 0 entry copies the input's dim at that position: the same elements, whatever the name
        in_shape = ctx.shape(x) or []
        out_shape = [in_shape[i] if isinstance(e, Lit) and e.value == 0 and i < len(in_shape) else d
                     for i, (e, d) in enumerate(zip(entries, out_shape, strict=False))]
    _regroup(node, ctx, out, out_shape)


def expand(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Broadcast to a target shape: kept axes couple, axes grown from 1 are new (and frozen)."""
    x, y = node.inputs[0], node.outputs[0]
    in_shape, out_shape = ctx.shape(x), ctx.shape(y)
    if in_shape is None or out_shape is None:
        freeze_node(node, ctx, out, f"{node_label(node)}: unknown shapes")
        return
    if _target_entries(node, ctx, out, y) is None:
        return
    lead = len(out_shape) - len(in_shape)
    for axis, dim in enumerate(in_shape):
        if dim == out_shape[axis + lead] and dim is not None:
            out.couple((x.name, axis), (y.name, axis + lead))
        elif dim != 1:
            reason = f"{node_label(node)}: cannot tell how axis {axis} of '{x.name}' expands"
            out.freeze((x.name, axis), reason)
            out.freeze((y.name, axis + lead), reason)
        elif ctx.gqa == "query" and isinstance(out_shape[axis + lead], int):
            # copies of one slice (repeat_kv): shrinking their count is a literal change
            out.repeated.add((y.name, axis + lead))
            out.touched.add((y.name, axis + lead))


def fix_squeeze(node: gs.Node, ctx: RewriteContext) -> None:
    """A Squeeze without axes drops every size-1 axis: a group pruned to one unit would vanish."""
    x = node.inputs[0]
    has_axes = (len(node.inputs) > 1 and node.inputs[1].name) or "axes" in node.attrs
    if has_axes or not is_touched(x, ctx):
        return
    axes = [axis for axis, dim in enumerate(x.shape) if dim == 1]  # shapes from before pruning
    if ctx.model.graph.opset < 13:
        node.attrs["axes"] = axes
    else:
        node.inputs.append(ctx.constant(f"{node.name}_axes", np.array(axes, dtype=np.int64)))


def _set_literals(node: gs.Node, index: int, edits: list[tuple[Lit, int]], ctx: RewriteContext) -> None:
    """Give each literal read through `node.inputs[index]` its new value, on a copy of the constant
    and of every node on the way to it: shape chains are often shared with other layers."""
    tensor = node.inputs[index]
    key = (id(tensor), tuple(sorted((tuple((id(n), j) for n, j in _path(lit)), lit.index, value)
                                    for lit, value in edits)))
    if key in ctx.copies:  # another layer needs the same sizes from the same chain: share the copy
        node.inputs[index] = ctx.copies[key]
        return
    if isinstance(tensor, gs.Constant):
        values = np.array(tensor.values).copy()
        flat = values.reshape(-1)
        for lit, value in edits:
            flat[lit.index] = value
        node.inputs[index] = ctx.copies[key] = ctx.constant(f"{node.name or tensor.name}_shape", values)
        return
    producer = _path(edits[0][0])[0][0]
    out = producer.outputs[0]
    clone = gs.Node(producer.op, ctx.unique(f"{producer.name}_pruned"), dict(producer.attrs), list(producer.inputs),
                    [gs.Variable(ctx.unique(f"{out.name}_pruned"), out.dtype, out.shape)])
    ctx.model.graph.nodes.append(clone)
    by_input: dict[int, list[tuple[Lit, int]]] = defaultdict(list)
    for lit, value in edits:
        path = _path(lit)
        by_input[path[0][1]].append((Lit(lit.value, path[1:], lit.index), value))
    for input_index, sub in by_input.items():
        _set_literals(clone, input_index, sub, ctx)
    node.inputs[index] = ctx.copies[key] = clone.outputs[0]


def fix_target(node: gs.Node, ctx: RewriteContext) -> None:
    """Reshape/Expand: every literal size of a pruned axis becomes the new size, whether the target
    is a constant or computed by a Shape -> Concat chain. A -1 there becomes the literal too: a
    per-layer head count in the graph is what ONNX Runtime's attention fusion reads. 0 (and
    Expand's 1) keep meaning "whatever the input has"; sizes read at run time follow by themselves."""
    y = node.outputs[0]
    resized = is_touched(y, ctx) or any((y.name, axis) in ctx.ratios for axis in range(len(y.shape or ())))
    if len(node.inputs) < 2 or not resized:
        return
    entries = shape_value(node.inputs[1])
    if entries is None:
        return  # an unreadable target froze every axis of the node (`_target_entries`)
    lead = len(y.shape) - len(entries)
    smallest = 1 if node.op == "Expand" else 0
    edits = []
    for position, entry in enumerate(entries):
        kept = ctx.kept_of(y, position + lead)
        if kept is not None and isinstance(entry, Lit) and entry.path is not None and (
                entry.value > smallest or entry.value == -1):
            edits.append((entry, len(kept)))
        elif isinstance(entry, Scaled) and entry.literal is not None and entry.literal.path is not None:
            # size * literal: the literal takes whatever the size does not follow by itself
            factor = entry.factor * ctx.ratio_of((y.name, position + lead)) / ctx.ratio_of(
                (entry.dim.tensor, entry.dim.axis))
            if factor != entry.factor and factor.denominator == 1:
                edits.append((entry.literal, entry.literal.value * int(factor) // entry.factor))
    if edits:
        _set_literals(node, 1, edits, ctx)


def lower_transpose(x, perm=None):
    return x.permute(perm if perm is not None else list(reversed(range(x.dim()))))


def lower_unsqueeze(x, axes_input=None, axes=None):
    axes = int_list(axes_input) if axes_input is not None else axes
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def lower_squeeze(x, axes_input=None, axes=None):
    axes = int_list(axes_input) if axes_input is not None else axes
    if axes is None:
        return x.squeeze()
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(axis)
    return x


def lower_flatten(x, axis=1):
    axis = axis + x.dim() if axis < 0 else axis  # axis may equal the rank: [prod, 1]
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def lower_reshape(x, shape, allowzero=0):
    target = int_list(shape)
    if not allowzero:
        target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
    return x.reshape(target)


def lower_expand(x, shape):
    target = int_list(shape)
    rank = max(x.dim(), len(target))
    dims = [1] * (rank - len(target)) + target
    current = [1] * (rank - x.dim()) + list(x.shape)
    return x.reshape(current).expand([c if d == 1 else d for c, d in zip(current, dims, strict=True)])


def lower_shape(x, start=0, end=None):
    return torch.tensor(list(x.shape), dtype=torch.int64)[start:end]


def lower_range(start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def lower_constant_of_shape(shape, value=0.0, dtype=1):
    return torch.full(int_list(shape), value, dtype=torch_dtype(dtype))


def lower_tile(x, repeats):
    return x.repeat(int_list(repeats))


def _constant_of_shape_value(node: gs.Node, attributes: dict, opset: int) -> None:
    """ConstantOfShape's `value` tensor becomes a Python scalar and the dtype it carries."""
    if "value" in node.attrs:
        array = np.asarray(getattr(node.attrs["value"], "values", node.attrs["value"]))
        attributes["dtype"] = int(onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
        attributes["value"] = array.reshape(-1)[0].item()


register("Transpose", rule=transpose, lowering=lower_transpose, cost=FREE)
register("Unsqueeze", rule=unsqueeze, lowering=lower_unsqueeze, cost=FREE, keyword_inputs={1: "axes_input"})
register("Squeeze", rule=squeeze, fixup=fix_squeeze, lowering=lower_squeeze, cost=FREE,
         keyword_inputs={1: "axes_input"})
register("Flatten", rule=flatten, lowering=lower_flatten, cost=FREE)
register("Reshape", rule=reshape, fixup=fix_target, lowering=lower_reshape, cost=FREE)
register("Expand", rule=expand, fixup=fix_target, lowering=lower_expand, cost=FREE)
register("Shape", rule=shape_rule, lowering=lower_shape, cost=FREE)
register("Range", lowering=lower_range, cost=ELEMENTWISE)
register("ConstantOfShape", lowering=lower_constant_of_shape, cost=ELEMENTWISE, attributes=_constant_of_shape_value)
register("Tile", lowering=lower_tile, cost=ELEMENTWISE)
register("Constant", cost=FREE)
