"""What an op declares, and the helpers op modules share.

An op family module (`elementwise`, `linear`, ...) registers each op once (`registry.register`)
with up to four functions, each following one contract defined here:
- a dependency **rule** `(node, RuleContext, Couplings) -> None` records how the op couples the axes
  ("slots") of its inputs and outputs; an op without one freezes every slot it touches, so an
  unknown op can never lead to a broken graph;
- a rewrite **fixup** `(node, RewriteContext) -> None` updates the op's size-carrying constants and
  attributes after the plan's units were sliced out (fixed constants are always *new* tensors);
- a **lowering** `(inputs..., **attributes) -> torch value` follows the ONNX definition with torch
  ops (`graphprune.torch.lowering` builds the fx module from them); `torch` and `F` here are imported on
  first use, so op modules load without torch;
- a **cost**: multiply-accumulates `(node) -> int`, or `FREE` (moves data) or `ELEMENTWISE` (one
  FLOP per output element).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, cast

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.errors import GraphpruneError
from graphprune.ir.model import Model, shape_of
from graphprune.lazy import F, torch  # noqa: F401 - the op modules' torch

if TYPE_CHECKING:
    import torch as _torch

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


# -- helpers of the dependency rules ------------------------------------------------------------


def node_label(node: gs.Node) -> str:
    return f"{node.op} node '{node.name or '(unnamed)'}'"


def known_dim(dim: Dim) -> bool:
    return isinstance(dim, int) or (isinstance(dim, str) and dim != "")


def all_static(dims: list[Dim]) -> list[int] | None:
    """`dims` when every one is an int, else None."""
    sizes = [d for d in dims if isinstance(d, int)]
    return sizes if len(sizes) == len(dims) else None


def present_tensors(tensors: list[gs.Tensor]) -> list[gs.Tensor]:
    return [t for t in tensors if t is not None and t.name != ""]


def freeze_node(node: gs.Node, ctx: RuleContext, out: Couplings, reason: str) -> None:
    for tensor in present_tensors(node.inputs) + present_tensors(node.outputs):
        out.freeze_tensor(tensor, reason)


def broadcast(node: gs.Node, ctx: RuleContext, out: Couplings, inputs: list[gs.Tensor],
              output: gs.Tensor, out_axes: list[int] | None = None) -> None:
    """Numpy broadcasting of `inputs` onto `output` (restricted to `out_axes` when given)."""
    out_shape = ctx.shape(output)
    if out_shape is None:
        for tensor in inputs + [output]:
            out.freeze_tensor(tensor, f"{node_label(node)}: output shape unknown")
        return
    out_rank = len(out_shape)
    axes = range(out_rank) if out_axes is None else out_axes
    for tensor in inputs:
        shape = ctx.shape(tensor)
        if shape is None:
            out.freeze_tensor(tensor, f"{node_label(node)}: input shape unknown")
            continue
        lead = out_rank - len(shape)
        for axis in range(len(shape)):
            out_axis = axis + lead
            if out_axis not in axes:
                continue
            dim, out_dim = shape[axis], out_shape[out_axis]
            if known_dim(dim) and dim == out_dim:
                out.couple((tensor.name, axis), (output.name, out_axis))
            elif dim == 1:
                continue  # broadcast: one value serves every unit
            else:
                reason = f"{node_label(node)}: cannot tell how axis {axis} of '{tensor.name}' broadcasts"
                out.freeze((tensor.name, axis), reason)
                out.freeze((output.name, out_axis), reason)


def input_rank(node: gs.Node, ctx: RuleContext, out: Couplings, minimum: int = 0) -> int | None:
    """Rank of the first input, or None after freezing the node when it is unknown (or too small)."""
    rank = ctx.rank(node.inputs[0])
    if rank is None or rank < minimum:
        freeze_node(node, ctx, out, f"{node_label(node)}: unknown input rank")
        return None
    return rank


def mark_contraction(node: gs.Node, out: Couplings, a: gs.Tensor, b: gs.Tensor, axis: Slot) -> None:
    """A unit summed away against another activation is not silenced by zero weights (a zero
    row still gives sigmoid(0) = 0.5 on both sides): removing it is not exact."""
    if not isinstance(a, gs.Constant) and not isinstance(b, gs.Constant):
        out.mark_inexact(axis, f"{node_label(node)} contracts this axis between two activations")


def channel_params(node: gs.Node, ctx: RuleContext, out: Couplings, params: slice) -> bool:
    """Shape-preserving op over [N, C, ...] whose `params` inputs are per-channel vectors on axis 1.
    Returns False (after freezing the node) when the input rank is unknown."""
    x, y = node.inputs[0], node.outputs[0]
    rank = input_rank(node, ctx, out, minimum=2)
    if rank is None:
        return False
    for axis in range(rank):
        out.couple((x.name, axis), (y.name, axis))
    for param in present_tensors(node.inputs[params]):
        out.couple((param.name, 0), (y.name, 1))
    return True


def optional_tensor(node: gs.Node, index: int, outputs: bool = False) -> gs.Tensor | None:
    tensors = node.outputs if outputs else node.inputs
    return tensors[index] if index < len(tensors) and tensors[index] is not None and tensors[index].name else None


def mark_unscored(node: gs.Node, ctx: RuleContext, out: Couplings, inputs: tuple[int, ...]) -> None:
    """The op's `inputs` (a registry field, e.g. a divisor) do not weigh a unit's contribution."""
    for index in inputs:
        if index < len(node.inputs) and node.inputs[index].name:
            tensor = node.inputs[index]
            out.unscored.update((tensor.name, axis) for axis in range(ctx.rank(tensor) or 0))


# -- the rewrite's context and helpers of the fixups --------------------------------------------


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


def old_dim(tensor: gs.Tensor, axis: int) -> int:
    """The size an axis had before the rewrite (a fixup only meets tensors of inferred shape)."""
    shape = shape_of(tensor)
    if shape is None:
        raise ValueError(f"'{tensor.name}' has no inferred shape before the rewrite")
    return cast(int, shape[axis])  # the axes a plan cuts are static


def is_touched(tensor: gs.Tensor, ctx: RewriteContext) -> bool:
    """Whether any axis of `tensor` loses units (False for tensors of unknown shape: never pruned)."""
    shape = shape_of(tensor)
    return shape is not None and any(ctx.kept_of(tensor, axis) is not None for axis in range(len(shape)))


def new_sizes(tensor: gs.Tensor, ctx: RewriteContext) -> list:
    return [ctx.size_of(tensor, axis, dim) for axis, dim in enumerate(tensor.shape)]


Fixup = Callable[[gs.Node, RewriteContext], None]


# -- lowering (torch is imported on first use: graphprune.lazy) -----------------------------------------------------------------
class LoweringError(GraphpruneError):
    """The graph holds an op (or an attribute value) the lowering does not support."""


def torch_dtype(onnx_type: int) -> _torch.dtype:
    return torch.from_numpy(np.zeros(0, onnx.helper.tensor_dtype_to_np_dtype(onnx_type))).dtype


def int_list(t: _torch.Tensor | list | None) -> list[int] | None:
    if t is None:
        return None
    return [int(v) for v in (t if isinstance(t, list | tuple) else t.reshape(-1).tolist())]


# -- costs -------------------------------------------------------------------------------------
#: cost of an op that only moves or relabels data
FREE = "free"
#: cost of one FLOP per output element
ELEMENTWISE = "elementwise"
CostRule = Callable[[gs.Node], int] | str


def static_dims(tensor: gs.Tensor) -> list[int] | None:
    shape = shape_of(tensor)
    if shape is None:
        return None
    return [d if isinstance(d, int) and d > 0 else 1 for d in shape]


def numel(tensor: gs.Tensor) -> int:
    dims = static_dims(tensor)
    return int(np.prod(dims, dtype=np.int64)) if dims is not None else 0
