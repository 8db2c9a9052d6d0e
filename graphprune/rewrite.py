"""Apply a plan: slice every member tensor, then fix the ops whose constants describe sizes.

Weights are sliced along each member axis. Activations need nothing: their shapes are
re-inferred. Ops that carry sizes or offsets as constants (Split sizes, Slice bounds) are fixed
by the `FIXUPS` table, one row per op type; fixed constants are always *new* tensors, so a
constant shared with another node never changes under it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.deps import Dependencies, segment_elements
from graphprune.ir import Model, shape_of
from graphprune.plan import Plan
from graphprune.rules import Slot, slice_start
from graphprune.rules_attention import fused_head_slots, head_slots
from graphprune.rules_conv import group_slot
from graphprune.shapes import Lit, Scaled, shape_value
from graphprune.weights import replacement

logger = logging.getLogger(__name__)


@dataclass
class RewriteContext:
    model: Model
    kept: dict[Slot, np.ndarray]  # only slots that changed
    names: set[str]
    #: new size / old size of every slot that loses units, symbolic ones (batch * heads) included
    ratios: dict[Slot, Fraction] = field(default_factory=dict)
    #: edited copies of shape constants and chains, by (original tensor, edits)
    copies: dict[tuple, gs.Tensor] = field(default_factory=dict)

    def ratio_of(self, slot: Slot) -> Fraction:
        return self.ratios.get(slot, Fraction(1))

    def kept_of(self, tensor: gs.Tensor, axis: int) -> np.ndarray | None:
        return self.kept.get((tensor.name, axis))

    def size_of(self, tensor: gs.Tensor, axis: int, old: int) -> int:
        kept = self.kept_of(tensor, axis)
        return old if kept is None else len(kept)

    def unique(self, name: str) -> str:
        base, suffix = name, 1
        while name in self.names:
            name, suffix = f"{base}_{suffix}", suffix + 1
        self.names.add(name)
        return name

    def constant(self, base: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.unique(f"{base}_pruned"), values)


def _old_dim(tensor: gs.Tensor, axis: int) -> int:
    shape = shape_of(tensor)
    return shape[axis]


def _touched(tensor: gs.Tensor, ctx: RewriteContext) -> bool:
    """Whether any axis of `tensor` loses units (False for tensors of unknown shape: never pruned)."""
    shape = shape_of(tensor)
    return shape is not None and any(ctx.kept_of(tensor, axis) is not None for axis in range(len(shape)))


def fix_split(node: gs.Node, ctx: RewriteContext) -> None:
    x = node.inputs[0]
    if not _touched(x, ctx):
        return
    axis = node.attrs.get("axis", 0) % len(x.shape)
    if ctx.kept_of(x, axis) is None:
        return
    sizes = np.array([ctx.size_of(y, axis, _old_dim(y, axis)) for y in node.outputs], dtype=np.int64)
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
    if not _touched(x, ctx) or not all(isinstance(t, gs.Constant) for t in node.inputs[1:] if t.name):
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
        size = _old_dim(x, axis)
        start = slice_start(int(starts[i]), size)
        new_start = int(np.count_nonzero(kept < start))
        starts[i] = new_start
        ends[i] = new_start + ctx.size_of(y, axis, _old_dim(y, axis))
        changed = True
    if changed:
        node.inputs[1] = ctx.constant(f"{node.name}_starts", starts.astype(index_type))
        node.inputs[2] = ctx.constant(f"{node.name}_ends", ends.astype(index_type))


def fix_squeeze(node: gs.Node, ctx: RewriteContext) -> None:
    """A Squeeze without axes drops every size-1 axis: a group pruned to one unit would vanish."""
    x = node.inputs[0]
    has_axes = (len(node.inputs) > 1 and node.inputs[1].name) or "axes" in node.attrs
    if has_axes or not _touched(x, ctx):
        return
    axes = [axis for axis, dim in enumerate(x.shape) if dim == 1]  # shapes from before pruning
    if ctx.model.graph.opset < 13:
        node.attrs["axes"] = axes
    else:
        node.inputs.append(ctx.constant(f"{node.name}_axes", np.array(axes, dtype=np.int64)))


def fix_conv(node: gs.Node, ctx: RewriteContext) -> None:
    """A grouped convolution keeps as many groups as its group slot kept."""
    kept = ctx.kept.get(group_slot(node))
    if kept is not None:
        node.attrs["group"] = len(kept)


def _new_sizes(tensor: gs.Tensor, ctx: RewriteContext) -> list:
    return [ctx.size_of(tensor, axis, dim) for axis, dim in enumerate(tensor.shape)]


def _set_literals(node: gs.Node, index: int, edits: list[tuple[Lit, int]], ctx: RewriteContext) -> None:
    """Give each literal read through `node.inputs[index]` its new value, on a copy of the constant
    and of every node on the way to it: shape chains are often shared with other layers."""
    tensor = node.inputs[index]
    key = (id(tensor), tuple(sorted((tuple((id(n), j) for n, j in lit.path), lit.index, value)
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
    producer = edits[0][0].path[0][0]
    out = producer.outputs[0]
    clone = gs.Node(producer.op, ctx.unique(f"{producer.name}_pruned"), dict(producer.attrs), list(producer.inputs),
                    [gs.Variable(ctx.unique(f"{out.name}_pruned"), out.dtype, out.shape)])
    ctx.model.graph.nodes.append(clone)
    by_input: dict[int, list[tuple[Lit, int]]] = defaultdict(list)
    for lit, value in edits:
        by_input[lit.path[0][1]].append((Lit(lit.value, lit.path[1:], lit.index), value))
    for input_index, sub in by_input.items():
        _set_literals(clone, input_index, sub, ctx)
    node.inputs[index] = ctx.copies[key] = clone.outputs[0]


def fix_target(node: gs.Node, ctx: RewriteContext) -> None:
    """Reshape/Expand: every literal size of a pruned axis becomes the new size, whether the target
    is a constant or computed by a Shape -> Concat chain. A -1 there becomes the literal too: a
    per-layer head count in the graph is what ONNX Runtime's attention fusion reads. 0 (and
    Expand's 1) keep meaning "whatever the input has"; sizes read at run time follow by themselves."""
    y = node.outputs[0]
    resized = _touched(y, ctx) or any((y.name, axis) in ctx.ratios for axis in range(len(y.shape or ())))
    if len(node.inputs) < 2 or not resized:
        return
    entries = shape_value(node.inputs[1])
    if entries is None:
        return  # an unreadable target froze every axis of the node (rules_shape._target_entries)
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


def fix_resize(node: gs.Node, ctx: RewriteContext) -> None:
    """A Resize given output `sizes` gets the new channel count."""
    y = node.outputs[0]
    if len(node.inputs) > 3 and node.inputs[3].name and _touched(y, ctx):
        node.inputs[3] = ctx.constant(f"{node.name}_sizes", np.array(_new_sizes(y, ctx), dtype=np.int64))


def fix_group_norm(node: gs.Node, ctx: RewriteContext) -> None:
    """One group per channel stays so (the rule freezes every other grouping)."""
    x = node.inputs[0]
    kept = ctx.kept_of(x, 1)
    if kept is not None and node.attrs.get("num_groups") == _old_dim(x, 1):
        node.attrs["num_groups"] = len(kept)


def fix_attention(node: gs.Node, ctx: RewriteContext) -> None:
    """3-D Attention: `q_num_heads` and `kv_num_heads` become the heads kept."""
    for slot, attribute in zip(head_slots(node), ("q_num_heads", "kv_num_heads"), strict=True):
        kept = ctx.kept.get(slot)
        if kept is not None and attribute in node.attrs:
            node.attrs[attribute] = len(kept)


def fix_rotary_embedding(node: gs.Node, ctx: RewriteContext) -> None:
    """`num_heads` follows the heads kept (the heads axis of a 4-D input, the factor of a 3-D one)."""
    x = node.inputs[0]
    if "num_heads" not in node.attrs or x.shape is None:
        return
    if len(x.shape) == 4:
        kept = ctx.kept_of(x, 1)
        heads = None if kept is None else len(kept)
    else:
        kept = ctx.kept.get((f"{node.outputs[0].name}#heads", 0))
        heads = None if kept is None else len(kept)
    ratio = ctx.ratio_of((x.name, 1)) if len(x.shape) == 4 else None
    if heads is None and ratio is not None and ratio != 1:
        heads = int(node.attrs["num_heads"] * ratio)
    if heads is not None:
        node.attrs["num_heads"] = heads


def fix_fused_attention(node: gs.Node, ctx: RewriteContext) -> None:
    """com.microsoft Attention / MultiHeadAttention / GroupQueryAttention: `num_heads` (and
    `kv_num_heads`) become the heads kept; Attention's `qkv_hidden_sizes` shrink with them."""
    q_slot, kv_slot = fused_head_slots(node)
    q_kept, kv_kept = ctx.kept.get(q_slot), ctx.kept.get(kv_slot)
    if q_kept is not None and "num_heads" in node.attrs:
        before = node.attrs["num_heads"]
        node.attrs["num_heads"] = len(q_kept)
        if "qkv_hidden_sizes" in node.attrs:
            node.attrs["qkv_hidden_sizes"] = [size // before * len(q_kept) for size in node.attrs["qkv_hidden_sizes"]]
    if kv_kept is not None and "kv_num_heads" in node.attrs:
        node.attrs["kv_num_heads"] = len(kv_kept)


#: op type -> function that updates the op's size-carrying constants/attributes after slicing.
FIXUPS: dict[str, Callable[[gs.Node, RewriteContext], None]] = {
    "Split": fix_split,
    "Slice": fix_slice,
    "Squeeze": fix_squeeze,
    "Conv": fix_conv,
    "Reshape": fix_target,
    "Expand": fix_target,
    "Resize": fix_resize,
    "GroupNormalization": fix_group_norm,
    "Attention": fix_attention,
    "RotaryEmbedding": fix_rotary_embedding,
}

#: the same for com.microsoft ops
CONTRIB_FIXUPS: dict[str, Callable[[gs.Node, RewriteContext], None]] = {
    "Attention": fix_fused_attention,
    "MultiHeadAttention": fix_fused_attention,
    "GroupQueryAttention": fix_fused_attention,
}


def size_ratios(deps: Dependencies, plan: Plan) -> dict[Slot, Fraction]:
    """New size / old size of every slot that loses units, also where the size is symbolic: a
    [batch * heads] axis keeps kept/units of its elements."""
    ratios = {}
    for slot, segments in deps.segments.items():
        if not any(seg.group in plan.kept for seg in segments):
            continue
        if all(seg.stop is not None and seg.repeats is not None for seg in segments):
            old = sum(seg.stop - seg.start for seg in segments)
            new = sum(len(plan.kept[seg.group]) * seg.unit_len * seg.repeats if seg.group in plan.kept
                      else seg.stop - seg.start for seg in segments)
            ratios[slot] = Fraction(new, old)
        elif len(segments) == 1:
            ratios[slot] = Fraction(len(plan.kept[segments[0].group]), deps.group(segments[0].group).units)
    return ratios


def kept_indices(deps: Dependencies, plan: Plan) -> dict[Slot, np.ndarray]:
    """Element indices kept along every slot that loses units (each unit is `unit_len` elements,
    repeated `repeats` times). A slot of symbolic size (batch * heads) is left out: it is an
    activation, whose size follows from the weights, and no literal can give it."""
    kept: dict[Slot, np.ndarray] = {}
    for slot, segments in deps.segments.items():
        if not any(seg.group in plan.kept for seg in segments):
            continue
        if any(seg.stop is None or seg.repeats is None for seg in segments):
            continue
        parts = [np.sort(segment_elements(seg.start, plan.kept[seg.group], deps.group(seg.group).units,
                                          seg.unit_len, seg.repeats))
                 if seg.group in plan.kept else np.arange(seg.start, seg.stop) for seg in segments]
        kept[slot] = np.concatenate(parts).astype(np.int64)
    return kept


def _resize_state(model: Model, kept: dict[Slot, np.ndarray]) -> dict[str, dict[int, list[int]]]:
    """Graph inputs and outputs that lose units (a KV cache's heads) get their new declared sizes;
    returns name -> axis -> kept indices, for the caller's feeds and reference outputs."""
    resized: dict[str, dict[int, list[int]]] = {}
    for tensor in [*model.graph.inputs, *model.graph.outputs]:
        for axis in range(len(tensor.shape or ())):
            indices = kept.get((tensor.name, axis))
            if indices is not None:
                tensor.shape = [len(indices) if a == axis else d for a, d in enumerate(tensor.shape)]
                resized.setdefault(tensor.name, {})[axis] = indices.tolist()
    return resized


def apply_plan(model: Model, deps: Dependencies, plan: Plan) -> dict[str, int]:
    """Remove the plan's units from `model` in place; returns counts for the report."""
    kept = kept_indices(deps, plan)
    tensors = model.tensors()
    ctx = RewriteContext(model, kept, set(tensors) | {n.name for n in model.graph.nodes}, size_ratios(deps, plan))
    params_before = model.param_count()
    by_tensor: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for (name, axis), indices in kept.items():
        by_tensor[name].append((axis, indices))
    sliced = 0
    for name, cuts in by_tensor.items():
        tensor = tensors.get(name)  # virtual slots (conv groups) are no tensor
        if isinstance(tensor, gs.Constant):
            values = old = tensor.values
            for axis, indices in cuts:
                values = np.take(values, indices, axis=axis)
            tensor.values = replacement(old, np.ascontiguousarray(values))
            sliced += 1
    resized = _resize_state(model, kept)
    for node in list(model.graph.nodes):
        fixup = FIXUPS.get(node.op) if (node.domain or "") in ("", "ai.onnx") else \
            CONTRIB_FIXUPS.get(node.op) if node.domain == "com.microsoft" else None
        if fixup is not None:
            fixup(node, ctx)
    model.graph.toposort()  # copied shape chains were appended at the end
    model.infer_shapes()
    stats = {
        "groups_pruned": len(plan.kept),
        "units_removed": plan.removed(deps),
        "tensors_sliced": sliced,
        "params_removed": params_before - model.param_count(),
    }
    if resized:
        stats["state"] = resized
    logger.info("pruned %(units_removed)d units in %(groups_pruned)d groups", stats)
    return stats
