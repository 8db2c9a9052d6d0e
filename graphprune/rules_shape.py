"""Dependency rules that regroup axes: Flatten, Reshape and Expand.

Axes are matched as products of factors (`match_axes`; symbolic dims such as `batch*seq` too).
A run of axes merged into one axis, or one axis split into several, is a `Factor` relation: the
product is made of its parts, outermost first. A run that both merges and splits ([batch, E] ->
[batch*heads, head_dim]) is first cut into the common factors of both sides (`common_factors`),
with a virtual slot for a factor no single axis holds. Which part's units the product follows is
decided over the whole graph (`deps.resolve_factors`); the other parts are frozen there. Literal
sizes of Reshape/Expand targets, constant or computed by Shape -> Concat chains
(`graphprune.shapes`), are recomputed by the rewrite.
"""

from __future__ import annotations

from collections import Counter

import onnx_graphsurgeon as gs

from graphprune.rules import Couplings, Dim, Rule, RuleContext, ScaledSize, _where, freeze_node
from graphprune.shapes import DimOf, Entry, Lit, Opaque, Product, Scaled, shape_value, sources


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
    reason = f"{_where(node)} merges or splits this axis with others"
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
    single = {}
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
    left, right = [Product.of(d) for d in a], [Product.of(d) for d in b]
    if any(p is None for p in left + right):
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
        left[i], right[j] = p.divide(atom), q.divide(atom)
        if left[i] == one:
            i += 1
        if right[j] == one:
            j += 1
    if i != len(left) or j != len(right):
        return None
    return sizes, groups_a, groups_b


def match_axes(in_shape: list[Dim], out_shape: list[Dim]) -> list[tuple[list[int], list[int]]] | None:
    """Runs of axes with equal products, left to right. Dims may be symbolic (`batch`, `unk__3*4`):
    a run grows on the side whose product divides the other's until both agree.

    Returns None when the shapes cannot be matched (an unknown dim, or products that never agree).
    """
    ins = [Product.of(d) for d in in_shape]
    outs = [Product.of(d) for d in out_shape]
    if any(p is None for p in ins + outs):
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
    if runs is None:
        freeze_node(node, ctx, out, f"{_where(node)}: cannot match input and output axes")
        return
    for ins, outs in runs:
        _couple_runs(node, out, x, y, ins, outs, in_shape, out_shape)


def flatten(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    _regroup(node, ctx, out, ctx.shape(node.outputs[0]))


def _literal_key(lit: Lit) -> tuple:
    return tuple((id(n), i) for n, i in lit.path), lit.index


def _target_entries(node: gs.Node, ctx: RuleContext, out: Couplings, y: gs.Tensor) -> list[Entry] | None:
    """The target's entries. A size that follows another tensor at run time keeps that tensor's axis
    coupled with this output axis; a size computed by arithmetic, or a literal the rewrite cannot
    reach, freezes its axis (and the sizes it was computed from)."""
    entries = shape_value(node.inputs[1])
    if entries is None:
        freeze_node(node, ctx, out, f"{_where(node)}: cannot read the target shape")
        return None
    lead = (ctx.rank(y) or len(entries)) - len(entries)
    # one literal read at several positions (Gather with repeated indices, a broadcast Where value)
    # cannot take two new sizes: freeze those positions
    seen = Counter(_literal_key(e) for e in entries if isinstance(e, Lit) and e.path is not None)
    for position, entry in enumerate(entries):
        slot = (y.name, position + lead)
        if isinstance(entry, Lit) and entry.path is not None and seen[_literal_key(entry)] > 1:
            out.freeze(slot, f"{_where(node)}: one literal gives several sizes")
        if isinstance(entry, DimOf):
            out.couple((entry.tensor, entry.axis), slot)
        elif isinstance(entry, Scaled) and entry.literal is not None and entry.literal.path is not None:
            out.scaled.append(ScaledSize((entry.dim.tensor, entry.dim.axis), slot, entry.factor))
            out.touched.add(slot)
        elif isinstance(entry, Scaled):
            out.block((entry.dim.tensor, entry.dim.axis), slot, entry.factor)
        elif isinstance(entry, Opaque):
            reason = f"{_where(node)}: size computed at run time"
            out.freeze(slot, reason)
            for source in entry.sources:
                out.freeze((source.tensor, source.axis), reason)
        elif entry.path is None and entry.value not in (-1, 0, 1):
            out.freeze(slot, f"{_where(node)}: literal size the rewrite cannot reach")
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
        freeze_node(node, ctx, out, f"{_where(node)}: unknown input rank")
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
            user = _where(consumer) if consumer is not None else f"graph output '{tensor.name}'"
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
        freeze_node(node, ctx, out, f"{_where(node)}: unknown shapes")
        return
    if _target_entries(node, ctx, out, y) is None:
        return
    lead = len(out_shape) - len(in_shape)
    for axis, dim in enumerate(in_shape):
        if dim == out_shape[axis + lead] and dim is not None:
            out.couple((x.name, axis), (y.name, axis + lead))
        elif dim != 1:
            reason = f"{_where(node)}: cannot tell how axis {axis} of '{x.name}' expands"
            out.freeze((x.name, axis), reason)
            out.freeze((y.name, axis + lead), reason)
        elif ctx.gqa == "query" and isinstance(out_shape[axis + lead], int):
            # copies of one slice (repeat_kv): shrinking their count is a literal change
            out.repeated.add((y.name, axis + lead))
            out.touched.add((y.name, axis + lead))


SHAPE_RULES: dict[str, Rule] = {
    "Flatten": flatten,
    "Reshape": reshape,
    "Expand": expand,
    "Shape": shape_rule,
}
