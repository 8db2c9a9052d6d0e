"""Dependency op rules: how each op type couples the axes ("slots") of its inputs and outputs.

One table, `RULES`, maps an op type to a function that records couplings into a `Couplings`
collector. Supporting a new op means adding a row. An op without a row freezes every slot it
touches (see `freeze_node`), so an unknown op can never lead to a broken graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.ir import shape_of

Slot = tuple[str, int]
Dim = int | str | None


@dataclass(frozen=True)
class Same:
    """Index i of slot `a` is index i of slot `b` (same size)."""

    a: Slot
    b: Slot


@dataclass(frozen=True)
class Offset:
    """Index i of slot `part` is index `start + i` of slot `whole` (Concat, Split, Slice)."""

    part: Slot
    whole: Slot
    start: int


@dataclass(frozen=True)
class Blocked:
    """Index u of slot `coarse` is indices [u * block, (u + 1) * block) of slot `fine`: a channel
    flattened with its H*W positions, a head split off its head_dim channels.

    With `outer` > 1 the pattern repeats: `fine` is [outer, coarse, block] flattened, so unit u is
    the strided set {o * period + u * block + r} (period = coarse size * block). A head of a merged
    [batch * heads] axis is such a set; `outer` may then be symbolic (`batch`)."""

    coarse: Slot
    fine: Slot
    block: int
    outer: Dim = 1

    @property
    def strided(self) -> bool:
        return self.outer != 1


@dataclass(frozen=True)
class Factor:
    """The elements of slot `whole` are the row-major product of `parts` (outermost first), as a
    Reshape that merges [batch, heads] into batch*heads or splits heads*head_dim into [heads,
    head_dim] lays them out. The whole follows the units of one part; which one is decided over the
    whole graph (`deps.resolve_factors`): the first part that is not frozen, so the head of a
    [batch * heads] axis is a unit although batch is the outer factor. The other parts are frozen
    with `reason`: removing part of them would not leave whole units."""

    whole: Slot
    parts: tuple[Slot, ...]
    sizes: tuple[Dim, ...]
    reason: str


@dataclass(frozen=True)
class ScaledSize:
    """A Reshape/Expand target gives slot `target` the size of slot `source` times a literal
    (`num_kv_heads * n_rep`, `batch * num_heads`). Where `source` can lose units the target follows
    it (a `Blocked` coupling; the literal stays); where it cannot (batch), the target's units come
    from elsewhere and the rewrite scales the literal with them."""

    source: Slot
    target: Slot
    factor: int


@dataclass
class Couplings:
    """What the rules found: couplings, frozen slots with reasons, and roles of slots."""

    same: list[Same] = field(default_factory=list)
    offsets: list[Offset] = field(default_factory=list)
    blocked: list[Blocked] = field(default_factory=list)
    factors: list[Factor] = field(default_factory=list)
    scaled: list[ScaledSize] = field(default_factory=list)
    frozen: dict[Slot, str] = field(default_factory=dict)
    frozen_tensors: dict[str, str] = field(default_factory=dict)
    produced: dict[Slot, str] = field(default_factory=dict)  # slot -> unit kind ("neuron", ...)
    inexact: dict[Slot, str] = field(default_factory=dict)  # removal changes outputs (normalization)
    #: slots that are no tensor's axis (the groups of a grouped conv), with their sizes
    virtual: dict[Slot, Dim] = field(default_factory=dict)
    #: weights that say nothing about a unit's contribution by their magnitude (divisors)
    unscored: set[Slot] = field(default_factory=set)
    #: slots the rule of the current node said something about (the rest is frozen after it)
    touched: set[Slot] = field(default_factory=set)
    #: axes that hold copies of one value (an Expand from size 1: the query heads that share a KV
    #: head); where a factor has such a part and query-head GQA pruning is asked for, it is the unit
    repeated: set[Slot] = field(default_factory=set)

    def couple(self, a: Slot, b: Slot) -> None:
        self.same.append(Same(a, b))
        self.touched.update((a, b))

    def offset(self, part: Slot, whole: Slot, start: int) -> None:
        self.offsets.append(Offset(part, whole, start))
        self.touched.update((part, whole))

    def block(self, coarse: Slot, fine: Slot, block: int) -> None:
        if block == 1:
            self.couple(coarse, fine)
        else:
            self.blocked.append(Blocked(coarse, fine, block))
            self.touched.update((coarse, fine))

    def factor(self, whole: Slot, parts: list[Slot], sizes: list[Dim], reason: str) -> None:
        self.factors.append(Factor(whole, tuple(parts), tuple(sizes), reason))
        self.touched.update([whole, *parts])

    def freeze(self, slot: Slot, reason: str) -> None:
        self.frozen.setdefault(slot, reason)
        self.touched.add(slot)

    def mark_inexact(self, slot: Slot, reason: str) -> None:
        """Removing a unit of this slot is allowed but changes outputs (normalized, reduced...)."""
        self.inexact[slot] = reason
        self.touched.add(slot)

    def freeze_tensor(self, tensor: gs.Tensor, reason: str) -> None:
        self.frozen_tensors.setdefault(tensor.name, reason)


class RuleContext:
    """Shape and constant queries the rules need (shapes must be inferred beforehand)."""

    def __init__(self, opset: int = 20, graph_outputs: frozenset[str] = frozenset(), gqa: str = "kv") -> None:
        self.opset = opset
        self.graph_outputs = graph_outputs
        #: grouped-query attention units: "kv" (a KV head with its query heads) or "query" (every
        #: KV head stays; query heads go, as many from each group)
        self.gqa = gqa

    def shape(self, tensor: gs.Tensor) -> list[Dim] | None:
        return shape_of(tensor)

    def rank(self, tensor: gs.Tensor) -> int | None:
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def dim(self, tensor: gs.Tensor, axis: int) -> Dim:
        shape = self.shape(tensor)
        return None if shape is None else shape[axis]

    @staticmethod
    def constant(tensor: gs.Tensor) -> np.ndarray | None:
        return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


Rule = Callable[[gs.Node, RuleContext, Couplings], None]


def _where(node: gs.Node) -> str:
    return f"{node.op} node '{node.name or '(unnamed)'}'"


def _known(dim: Dim) -> bool:
    return isinstance(dim, int) or (isinstance(dim, str) and dim != "")


def _present(tensors: list[gs.Tensor]) -> list[gs.Tensor]:
    return [t for t in tensors if t is not None and t.name != ""]


def freeze_node(node: gs.Node, ctx: RuleContext, out: Couplings, reason: str) -> None:
    for tensor in _present(node.inputs) + _present(node.outputs):
        out.freeze_tensor(tensor, reason)


def broadcast(node: gs.Node, ctx: RuleContext, out: Couplings, inputs: list[gs.Tensor],
              output: gs.Tensor, out_axes: list[int] | None = None) -> None:
    """Numpy broadcasting of `inputs` onto `output` (restricted to `out_axes` when given)."""
    out_shape = ctx.shape(output)
    if out_shape is None:
        for tensor in inputs + [output]:
            out.freeze_tensor(tensor, f"{_where(node)}: output shape unknown")
        return
    out_rank = len(out_shape)
    axes = range(out_rank) if out_axes is None else out_axes
    for tensor in inputs:
        shape = ctx.shape(tensor)
        if shape is None:
            out.freeze_tensor(tensor, f"{_where(node)}: input shape unknown")
            continue
        lead = out_rank - len(shape)
        for axis in range(len(shape)):
            out_axis = axis + lead
            if out_axis not in axes:
                continue
            dim, out_dim = shape[axis], out_shape[out_axis]
            if _known(dim) and dim == out_dim:
                out.couple((tensor.name, axis), (output.name, out_axis))
            elif dim == 1:
                continue  # broadcast: one value serves every unit
            else:
                reason = f"{_where(node)}: cannot tell how axis {axis} of '{tensor.name}' broadcasts"
                out.freeze((tensor.name, axis), reason)
                out.freeze((output.name, out_axis), reason)


def _input_rank(node: gs.Node, ctx: RuleContext, out: Couplings, minimum: int = 0) -> int | None:
    """Rank of the first input, or None after freezing the node when it is unknown (or too small)."""
    rank = ctx.rank(node.inputs[0])
    if rank is None or rank < minimum:
        freeze_node(node, ctx, out, f"{_where(node)}: unknown input rank")
        return None
    return rank


def elementwise(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Unary, binary and variadic elementwise ops with numpy broadcasting."""
    for output in _present(node.outputs):
        broadcast(node, ctx, out, _present(node.inputs), output)


def _contraction(node: gs.Node, out: Couplings, a: gs.Tensor, b: gs.Tensor, axis: Slot) -> None:
    """A unit summed away against another activation is not silenced by zero weights (a zero
    row still gives sigmoid(0) = 0.5 on both sides): removing it is not exact."""
    if not isinstance(a, gs.Constant) and not isinstance(b, gs.Constant):
        out.mark_inexact(axis, f"{_where(node)} contracts this axis between two activations")


def gemm(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Y[M,N] = A[M,K] @ B[K,N] + C, with transA/transB; B's N axis produces neurons."""
    a, b = node.inputs[0], node.inputs[1]
    y = node.outputs[0]
    trans_a, trans_b = node.attrs.get("transA", 0), node.attrs.get("transB", 0)
    a_m, a_k = (a.name, 1 if trans_a else 0), (a.name, 0 if trans_a else 1)
    b_k, b_n = (b.name, 1 if trans_b else 0), (b.name, 0 if trans_b else 1)
    out.couple(a_k, b_k)
    _contraction(node, out, a, b, a_k)
    out.couple(a_m, (y.name, 0))
    out.couple(b_n, (y.name, 1))
    if isinstance(b, gs.Constant):
        out.produced.setdefault(b_n, "neuron")
    if len(node.inputs) > 2 and node.inputs[2].name:
        broadcast(node, ctx, out, [node.inputs[2]], y)


def matmul(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Numpy matmul: contraction axis couples A and B, batch axes broadcast."""
    a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
    rank_a, rank_b, rank_y = ctx.rank(a), ctx.rank(b), ctx.rank(y)
    if rank_a is None or rank_b is None or rank_y is None or rank_a < 2 or rank_b < 2:
        freeze_node(node, ctx, out, f"{_where(node)}: vector or unknown-rank MatMul")
        return
    out.couple((a.name, rank_a - 1), (b.name, rank_b - 2))
    _contraction(node, out, a, b, (a.name, rank_a - 1))
    out.couple((a.name, rank_a - 2), (y.name, rank_y - 2))
    out.couple((b.name, rank_b - 1), (y.name, rank_y - 1))
    if isinstance(b, gs.Constant):
        out.produced.setdefault((b.name, rank_b - 1), "neuron")
    broadcast(node, ctx, out, [a, b], y, out_axes=list(range(rank_y - 2)))
    # the inputs' last two axes were handled above; keep broadcast from reading them
    # (it only visits output axes < rank_y - 2, which map to the inputs' batch axes)


def channel_params(node: gs.Node, ctx: RuleContext, out: Couplings, params: slice) -> bool:
    """Shape-preserving op over [N, C, ...] whose `params` inputs are per-channel vectors on axis 1.
    Returns False (after freezing the node) when the input rank is unknown."""
    x, y = node.inputs[0], node.outputs[0]
    rank = _input_rank(node, ctx, out, minimum=2)
    if rank is None:
        return False
    for axis in range(rank):
        out.couple((x.name, axis), (y.name, axis))
    for param in _present(node.inputs[params]):
        out.couple((param.name, 0), (y.name, 1))
    return True


def batch_norm(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Per-channel scale, bias, mean and variance follow axis 1."""
    if not channel_params(node, ctx, out, slice(1, 5)):
        return
    for extra in _present(node.outputs[1:]):  # training mode: running mean and variance
        out.couple((extra.name, 0), (node.outputs[0].name, 1))


def layer_norm(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Normalization over the last axis couples scale/bias with it; removing a unit is not exact."""
    x, y = node.inputs[0], node.outputs[0]
    rank = _input_rank(node, ctx, out)
    if rank is None:
        return
    axis = node.attrs.get("axis", -1) % rank
    for a in range(rank):
        out.couple((x.name, a), (y.name, a))
    params = _present(node.inputs[1:3])
    if axis == rank - 1:
        for param in params:
            # scale/bias broadcast against X.shape[axis:]: their last axis is the channel axis
            last = (ctx.rank(param) or 0) - 1
            if last >= 0 and ctx.dim(param, last) == ctx.dim(x, axis):
                out.couple((param.name, last), (y.name, axis))
            elif last >= 0 and ctx.dim(param, last) != 1:
                reason = f"{_where(node)}: cannot map parameter '{param.name}' to the normalized axis"
                out.freeze((param.name, last), reason)
                out.freeze((y.name, axis), reason)
        out.mark_inexact((y.name, axis), f"{_where(node)} normalizes over this axis")
        out.produced[(y.name, axis)] = "hidden"  # a normalized feature axis: the residual stream
    else:
        reason = f"{_where(node)} normalizes over several axes"
        for a in range(axis, rank):
            out.freeze((x.name, a), reason)
        for param in params:
            out.freeze_tensor(param, reason)
    for extra in _present(node.outputs[1:]):
        out.freeze_tensor(extra, f"{_where(node)}: mean/inv-std outputs")


def softmax(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    x, y = node.inputs[0], node.outputs[0]
    rank = _input_rank(node, ctx, out)
    if rank is None:
        return
    if ctx.opset < 13:
        # before opset 13 the input is coerced to 2-D: every axis from `axis` on is normalized
        axis = node.attrs.get("axis", 1) % rank
        normalized = range(axis, rank)
    else:
        normalized = [node.attrs.get("axis", -1) % rank]
    for a in range(rank):
        if a in normalized:
            out.freeze((x.name, a), f"{_where(node)} normalizes over this axis")
            out.freeze((y.name, a), f"{_where(node)} normalizes over this axis")
        else:
            out.couple((x.name, a), (y.name, a))


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
            reason = f"{_where(node)}: '{part.name}' has unknown size on axis {axis}"
            for tensor in parts + [whole]:
                out.freeze((tensor.name, axis), reason)
            return
        out.offset((part.name, axis), (whole.name, axis), start)
        start += size


def concat(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    y = node.outputs[0]
    rank = ctx.rank(y)
    if rank is None:
        freeze_node(node, ctx, out, f"{_where(node)}: unknown output rank")
        return
    _lay_end_to_end(node, ctx, out, _present(node.inputs), y, rank, node.attrs["axis"] % rank)


def split(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    rank = _input_rank(node, ctx, out)
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
        freeze_node(node, ctx, out, f"{_where(node)}: slice axes are not constants")
        return
    count = ctx.dim(node.inputs[1], 0) if bounds[0] is None else len(bounds[0])
    if axes_value is None and not isinstance(count, int):
        freeze_node(node, ctx, out, f"{_where(node)}: cannot tell which axes are sliced")
        return
    axes = list(range(count)) if axes_value is None else [int(a) % rank for a in axes_value]
    constant = all(b is not None for b, present in zip(bounds, given, strict=True) if present)
    starts = bounds[0]
    steps = [1] * len(axes) if bounds[3] is None else [int(s) for s in bounds[3]]
    for axis in range(rank):
        if axis not in axes:
            out.couple((x.name, axis), (y.name, axis))
            continue
        i = axes.index(axis)
        size = ctx.dim(x, axis)
        if not constant or steps[i] != 1 or not isinstance(size, int) or not isinstance(ctx.dim(y, axis), int):
            reason = f"{_where(node)}: strided, run-time or unknown-size slice on axis {axis}"
            out.freeze((x.name, axis), reason)
            out.freeze((y.name, axis), reason)
            continue
        out.offset((y.name, axis), (x.name, axis), slice_start(int(starts[i]), size))


def transpose(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    x, y = node.inputs[0], node.outputs[0]
    rank = _input_rank(node, ctx, out)
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
        freeze_node(node, ctx, out, f"{_where(node)}: axes or ranks unknown")
        return
    inserted = {a % rank_y for a in axes}
    kept = [a for a in range(rank_y) if a not in inserted]
    for in_axis, out_axis in enumerate(kept):
        out.couple((x.name, in_axis), (y.name, out_axis))


def squeeze(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    x, y = node.inputs[0], node.outputs[0]
    shape, axes = ctx.shape(x), _axes_operand(node, ctx)
    if shape is None:
        freeze_node(node, ctx, out, f"{_where(node)}: unknown input rank")
        return
    if axes is None:
        if any(not isinstance(d, int) for d in shape):
            freeze_node(node, ctx, out, f"{_where(node)}: squeezes unknown dims")
            return
        axes = [a for a, d in enumerate(shape) if d == 1]
    removed = {a % len(shape) for a in axes}
    kept = [a for a in range(len(shape)) if a not in removed]
    for out_axis, in_axis in enumerate(kept):
        out.couple((x.name, in_axis), (y.name, out_axis))


def gather(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Y = data indexed along `axis` by `indices`: data's other axes and the indices' axes carry
    over to Y (an embedding's feature axis is the hidden size); the indexed axis is frozen."""
    data, indices, y = node.inputs[0], node.inputs[1], node.outputs[0]
    rank_d, rank_i = ctx.rank(data), ctx.rank(indices)
    if rank_d is None or rank_i is None:
        freeze_node(node, ctx, out, f"{_where(node)}: unknown ranks")
        return
    axis = node.attrs.get("axis", 0) % rank_d
    for a in range(axis):
        out.couple((data.name, a), (y.name, a))
    for a in range(rank_i):
        out.couple((indices.name, a), (y.name, axis + a))
    for a in range(axis + 1, rank_d):
        out.couple((data.name, a), (y.name, a - 1 + rank_i))


#: op type -> inputs whose values are not magnitudes of a unit's contribution: a zero divisor
#: makes a unit infinite, not dead; BatchNorm statistics shift and scale, they do not weigh.
#: Importance ignores them and unstructured pruning never zeroes them.
UNSCORED_INPUTS: dict[str, tuple[int, ...]] = {
    "Div": (1,),
    "BatchNormalization": (3, 4),
}


def mark_unscored(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    for index in UNSCORED_INPUTS.get(node.op, ()):
        if index < len(node.inputs) and node.inputs[index].name:
            tensor = node.inputs[index]
            out.unscored.update((tensor.name, axis) for axis in range(ctx.rank(tensor) or 0))


def unscored_inputs(graph: gs.Graph) -> set[str]:
    """Names of the tensors UNSCORED_INPUTS designates anywhere in `graph`."""
    return {node.inputs[i].name for node in graph.nodes for i in UNSCORED_INPUTS.get(node.op, ())
            if i < len(node.inputs)}


ELEMENTWISE_OPS = (
    # activations and unary math
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Gelu", "Clip", "HardSwish", "HardSigmoid",
    "Softplus", "Softsign", "Erf", "Elu", "Selu", "Celu", "Mish", "ThresholdedRelu", "Exp", "Log",
    "Sqrt", "Reciprocal", "Neg", "Abs", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign",
    # predicates and logic (masks)
    "IsNaN", "IsInf", "Not", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor",
    # plumbing that keeps shape
    "Identity", "Dropout", "Cast", "CastLike",
    # binary / variadic with broadcasting
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where",
)

#: op type -> dependency rule. Ops not listed freeze every slot they touch.
RULES: dict[str, Rule] = {
    **{op: elementwise for op in ELEMENTWISE_OPS},
    "Gemm": gemm,
    "MatMul": matmul,
    "BatchNormalization": batch_norm,
    "LayerNormalization": layer_norm,
    "Softmax": softmax,
    "Gather": gather,
    "LogSoftmax": softmax,
    "Concat": concat,
    "Split": split,
    "Slice": slice_rule,
    "Transpose": transpose,
    "Unsqueeze": unsqueeze,
    "Squeeze": squeeze,
}

# the convolution and axis-regrouping rows live in their own modules (they import the helpers above)
from graphprune.rules_attention import ATTENTION_RULES  # noqa: E402
from graphprune.rules_conv import CONV_RULES  # noqa: E402
from graphprune.rules_shape import SHAPE_RULES  # noqa: E402

RULES.update(CONV_RULES)
RULES.update(SHAPE_RULES)
RULES.update(ATTENTION_RULES)
