"""Dependency analysis: slots coupled by op rules become pruning groups (networkx components).

A *slot* is one axis of one tensor. Op rules (`graphprune.ops`) couple slots index-for-index
(`Same`), with an offset (`Offset`: Concat/Split/Slice) or as factors of a product (`Factor`:
Reshape/Flatten merging or splitting axes). Each factor relation is first resolved into a
`Blocked` coupling of the product with one of its parts (`resolve_factors`): a unit of that part is
a block of consecutive elements of the product, repeated once per index of the parts outside it
(head h of a merged [batch * heads] axis is {b * heads + h}). Offsets cut slots into *segments*;
the cuts are propagated through every coupling until they agree, then each segment is a node of
a networkx graph whose connected components are the groups. A group's units are removed together
from every member. A group is frozen when any member is frozen (graph input/output, unknown op,
an axis a rule cannot map), and the first reasons are kept for `inspect`.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis.shapes import Monomial, Product, product
from graphprune.analysis.state import state_tensors
from graphprune.ir.model import Model, shape_of
from graphprune.ops import spec_of
from graphprune.ops.base import Blocked, Couplings, RuleContext, Slot, freeze_node, mark_unscored

logger = logging.getLogger(__name__)

MAX_REASONS = 5


@dataclass(frozen=True)
class Member:
    """Elements [start, stop) along `axis` of `tensor` belong to the group, one per unit."""

    tensor: str
    axis: int
    start: int
    stop: int | None
    is_weight: bool
    scored: bool = True  # counts towards the unit's importance (divisors do not)
    unit_len: int = 1  # consecutive elements per unit (H*W for a flattened channel)
    #: how often the pattern of units repeats along the segment: >1 where an outer factor was
    #: merged in (packed QKV [3 * E], batch * heads); None when that count is symbolic (batch)
    repeats: int | None = 1

    @property
    def length(self) -> int:
        """Elements in [start, stop): static for a weight, and for an activation whose units are
        counted (`stop` is None only where the axis is symbolic)."""
        if self.stop is None:
            raise ValueError(f"'{self.tensor}' axis {self.axis}: the member's size is symbolic, not a count")
        return self.stop - self.start

    def unit_elements(self, units: np.ndarray, count: int) -> np.ndarray:
        """Indices along `axis` of the elements of `units` (of `count` in all), unit by unit."""
        return segment_elements(self.start, units, count, self.unit_len, self.repeats or 1)


class Segment(NamedTuple):
    """Elements [start, stop) of a slot that belong to group `group`, `unit_len` consecutive ones
    per unit, the pattern repeated `repeats` times (None: a symbolic count)."""

    start: int
    stop: int | None
    group: int
    unit_len: int
    repeats: int | None

    @property
    def static(self) -> bool:
        """Whether its size and repeat count are numbers (a slot of weights, unlike batch * heads)."""
        return self.stop is not None and self.repeats is not None

    @property
    def length(self) -> int:
        """Elements in [start, stop), for a `static` segment."""
        if self.stop is None:
            raise ValueError(f"the segment at {self.start} of group {self.group} has a symbolic size")
        return self.stop - self.start

    @property
    def repeat_count(self) -> int:
        """How often the pattern of units repeats, for a `static` segment."""
        if self.repeats is None:
            raise ValueError(f"the segment at {self.start} of group {self.group} repeats a symbolic number "
                             "of times")
        return self.repeats


def segment_elements(start: int, units: np.ndarray, count: int, unit_len: int, repeats: int) -> np.ndarray:
    """Element indices of `units` of a segment laid out as [repeats, count, unit_len] (row-major),
    unit-major: unit u's elements for every repeat, then the next unit's."""
    units = np.asarray(units, dtype=np.int64)
    offsets = np.arange(repeats)[:, None] * (count * unit_len) + np.arange(unit_len)[None, :]
    return start + (units[:, None, None] * unit_len + offsets[None]).reshape(-1)


#: group kinds pruned only on request: the residual stream (`--prune-hidden`)
OPT_IN_KINDS = frozenset({"hidden"})


@dataclass(frozen=True)
class Group:
    id: int
    kind: str
    units: int | None
    members: tuple[Member, ...]
    frozen: tuple[str, ...]
    exact: bool  # removing a unit whose weights are all zero leaves the outputs unchanged

    @property
    def weights(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.is_weight)

    @property
    def status(self) -> str:
        return "prunable" if self.prunable else "frozen: " + "; ".join(self.frozen or ("single unit",))

    @property
    def scored_weights(self) -> tuple[Member, ...]:
        """The weights whose magnitude measures a unit's contribution (all weights if none do)."""
        return tuple(m for m in self.weights if m.scored) or self.weights

    @property
    def prunable(self) -> bool:
        return not self.frozen and bool(self.weights) and isinstance(self.units, int) and self.units > 1

    @property
    def unit_count(self) -> int:
        """`units` where it is a number, as it is for every prunable group (plans, scores and
        rewrites only deal with those)."""
        if self.units is None:
            raise ValueError(f"group {self.id} ({self.kind}) has a symbolic number of units: only a prunable "
                             "group can be planned, scored or cut")
        return self.units


@dataclass(frozen=True)
class Dependencies:
    groups: tuple[Group, ...]
    #: every slot's segments in order
    segments: Mapping[Slot, tuple[Segment, ...]]

    def group(self, group_id: int) -> Group:
        return self.groups[group_id]

    @property
    def prunable(self) -> tuple[Group, ...]:
        return tuple(g for g in self.groups if g.prunable)

    @property
    def stats(self) -> dict[str, int]:
        weighted = self.weight_groups
        return {"groups": len(weighted), "prunable": len(self.prunable),
                "frozen": sum(1 for g in weighted if g.frozen)}

    @property
    def weight_groups(self) -> tuple[Group, ...]:
        """Groups that hold weights: the ones worth listing (frozen or not)."""
        return tuple(g for g in self.groups if g.weights)


def collect_couplings(model: Model, gqa: str = "kv") -> Couplings:
    ctx = RuleContext(opset=model.graph.opset, graph_outputs=frozenset(t.name for t in model.graph.outputs), gqa=gqa)
    out = Couplings()
    state = state_tensors(model)  # a KV cache may lose heads: the rules say which axes
    for tensor in model.graph.inputs:
        if tensor.name not in state:
            out.freeze_tensor(tensor, f"graph input '{tensor.name}'")
    for tensor in model.graph.outputs:
        if tensor.name not in state:
            out.freeze_tensor(tensor, f"graph output '{tensor.name}'")
    outer = model.tensors()
    for node in model.graph.nodes:
        for name in _subgraph_reads(node) & outer.keys():
            out.freeze_tensor(outer[name], f"read inside a subgraph of {node.op} node '{node.name or '(unnamed)'}'")
        spec = spec_of(node)
        if spec is None or spec.rule is None:
            note = f": {spec.note}" if spec is not None and spec.note else ""
            freeze_node(node, ctx, out, f"no dependency rule for {node.op} (node '{node.name or '(unnamed)'}'){note}")
            continue
        out.touched = set()
        spec.rule(node, ctx, out)
        mark_unscored(node, ctx, out, spec.unscored_inputs)
        _freeze_untouched(node, ctx, out)
    return out


def _freeze_untouched(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Every axis of the node's tensors that its rule neither coupled nor marked is frozen: a rule
    that forgets an axis (a padded or resized one, a conv's spatial axes) must not let a unit
    change size through it."""
    for tensor in list(node.inputs) + list(node.outputs):
        if tensor is None or not tensor.name or tensor.name in out.frozen_tensors:
            continue
        if isinstance(tensor, gs.Constant) and len(tensor.outputs) <= 1:
            continue  # a kernel axis no other node reads cannot be cut by anything
        rank = ctx.rank(tensor)
        for axis in range(rank or 0):
            if (tensor.name, axis) not in out.touched:
                out.freeze((tensor.name, axis), f"{node.op} node '{node.name or '(unnamed)'}' does not map "
                                                f"axis {axis} of '{tensor.name}'")


def _subgraph_reads(node: gs.Node) -> set[str]:
    """Names every subgraph of `node` (If/Loop/Scan bodies, nested too) reads."""
    names: set[str] = set()
    for value in node.attrs.values():
        for graph in value if isinstance(value, list) else [value]:
            if isinstance(graph, gs.Graph):
                for inner in graph.nodes:
                    names.update(t.name for t in inner.inputs if t.name)
                    names |= _subgraph_reads(inner)
    return names


class _Components:
    """Union-find over slots."""

    def __init__(self) -> None:
        self.parent: dict[Slot, Slot] = {}

    def find(self, slot: Slot) -> Slot:
        root = self.parent.setdefault(slot, slot)
        while root != self.parent[root]:
            root = self.parent[root]
        while self.parent[slot] != root:
            self.parent[slot], slot = root, self.parent[slot]
        return root

    def union(self, a: Slot, b: Slot) -> None:
        self.parent[self.find(a)] = self.find(b)


def resolve_factors(couplings: Couplings) -> None:
    """Turn every `Factor` into a `Blocked` coupling of the product with one part; the other parts
    are frozen. Which part is the unit:

    - where the product already has a layout (an earlier factor of an index-for-index equal slot:
      the [batch * heads] axis a merge made, which a later Reshape splits again), the part at the
      same place in it, so a merge and its split agree;
    - else a part that holds copies of one value (marked only for `--gqa query`: the query heads
      that share a KV head), so those copies are the unit and every KV head stays;
    - else the first part not frozen by what is known so far (couplings other than factors,
      factors resolved before it): the batch of a merged [batch * heads] axis reaches a graph
      input, so heads are the unit there, while a [heads * head_dim] split keeps heads.
    """
    groups, equal = _Components(), _Components()  # all couplings so far; index-for-index ones
    for same in couplings.same:
        groups.union(same.a, same.b)
        equal.union(same.a, same.b)
    for off in couplings.offsets:
        groups.union(off.part, off.whole)
    for blocked in couplings.blocked:
        groups.union(blocked.coarse, blocked.fine)
    frozen_slots = set(couplings.frozen)
    for factor in couplings.factors:
        frozen_slots.update(s for s in (factor.whole, *factor.parts) if s[0] in couplings.frozen_tensors)
    frozen_slots.update(s for s in groups.parent if s[0] in couplings.frozen_tensors)
    frozen = {groups.find(s) for s in frozen_slots}
    #: equal-slot root -> (outer, inner) of its unit's elements
    layouts: dict[Slot, tuple[Product, Product]] = {}

    def freeze(slot: Slot, reason: str) -> None:
        couplings.freeze(slot, reason)
        frozen.add(groups.find(slot))

    for factor in couplings.factors:
        placed = [i for i in range(len(factor.parts))
                  if (product(list(factor.sizes[:i])), product(list(factor.sizes[i + 1:])))
                  == layouts.get(equal.find(factor.whole))]
        # copies of a KV head (only marked when query-head GQA pruning is asked for)
        copies = [i for i, part in enumerate(factor.parts) if part in couplings.repeated]
        choice = placed[0] if placed else copies[0] if copies else next(
            (i for i, part in enumerate(factor.parts) if groups.find(part) not in frozen), 0)
        inner = factor.sizes[choice + 1:]
        static_inner = [d for d in inner if isinstance(d, int)]
        outer = product(list(factor.sizes[:choice]))
        if outer is None or len(static_inner) != len(inner):
            # a unit that is no fixed number of consecutive elements cannot be mapped
            for slot in (factor.whole, *factor.parts):
                freeze(slot, factor.reason)
            continue
        block = math.prod(static_inner)
        unit = factor.parts[choice]
        couplings.blocked.append(Blocked(unit, factor.whole, block, outer.dim))
        layouts.setdefault(equal.find(factor.whole), (outer, Product(block)))
        layouts.setdefault(equal.find(unit), (Product(1), Product(1)))
        was_frozen = groups.find(unit) in frozen or groups.find(factor.whole) in frozen
        groups.union(unit, factor.whole)
        if was_frozen:
            frozen.add(groups.find(unit))
        for index, part in enumerate(factor.parts):
            if index != choice:
                freeze(part, factor.reason)
    couplings.factors.clear()
    for scaled in couplings.scaled:
        if groups.find(scaled.source) not in frozen:
            couplings.blocked.append(Blocked(scaled.source, scaled.target, scaled.factor))
            groups.union(scaled.source, scaled.target)


def _slot_sizes(model: Model, couplings: Couplings) -> dict[Slot, int | str | None]:
    tensors = model.tensors()
    slots: set[Slot] = set()
    for same in couplings.same:
        slots.update((same.a, same.b))
    for offset in couplings.offsets:
        slots.update((offset.part, offset.whole))
    for blocked in couplings.blocked:
        slots.update((blocked.coarse, blocked.fine))
    slots.update(couplings.frozen)
    for name in couplings.frozen_tensors:
        # every axis of a frozen tensor is a slot, so `inspect` lists frozen weights too
        tensor = tensors[name]
        shape = shape_of(tensor)
        slots.update((name, axis) for axis in range(len(shape or ())))
    sizes: dict[Slot, int | str | None] = dict(couplings.virtual)
    for name, axis in slots - couplings.virtual.keys():
        tensor = tensors[name]
        shape = shape_of(tensor)
        sizes[(name, axis)] = shape[axis] if shape is not None and axis < len(shape) else None
    return sizes


def _part_size(sizes: Mapping[Slot, int | str | None], part: Slot) -> int:
    """The size of an `Offset`'s part: rules record an offset only where the part's size is static."""
    size = sizes[part]
    if size is None or isinstance(size, str):
        raise ValueError(f"'{part[0]}' axis {part[1]} is part of another axis but has no static size")
    return size


def _refine_cuts(sizes: dict[Slot, int | str | None], couplings: Couplings) -> dict[Slot, list[int]]:
    """Propagate segment boundaries across couplings until every coupled pair agrees."""
    # edge: (target, num, den, shift, lo, hi): a cut c of the source lands at c * num / den + shift
    # in the target when lo <= c <= hi (and c * num divides by den: else the cut splits a block)
    edges: dict[Slot, list[tuple[Slot, int, int, int, int, float]]] = defaultdict(list)
    inf = float("inf")
    for same in couplings.same:
        edges[same.a].append((same.b, 1, 1, 0, 0, inf))
        edges[same.b].append((same.a, 1, 1, 0, 0, inf))
    for off in couplings.offsets:
        length = _part_size(sizes, off.part)
        edges[off.part].append((off.whole, 1, 1, off.start, 0, inf))
        edges[off.whole].append((off.part, 1, 1, -off.start, off.start, off.start + length))
    for blocked in couplings.blocked:
        if blocked.strided:
            continue  # a cut of a strided unit's axis is no cut of the other: checked below
        edges[blocked.coarse].append((blocked.fine, blocked.block, 1, 0, 0, inf))
        edges[blocked.fine].append((blocked.coarse, 1, blocked.block, 0, 0, inf))
    cuts: dict[Slot, set[int]] = {s: {0} | ({size} if isinstance(size, int) else set())
                                  for s, size in sizes.items()}
    for off in couplings.offsets:
        cuts[off.whole].update((off.start, off.start + _part_size(sizes, off.part)))
    work = list(cuts)
    while work:
        slot = work.pop()
        for target, num, den, shift, lo, hi in edges[slot]:
            new = set()
            for c in cuts[slot]:
                if not lo <= c <= hi:
                    continue
                if (c * num) % den:
                    reason = f"a cut at {c} of '{slot[0]}' axis {slot[1]} splits a unit of {den} elements"
                    couplings.frozen.setdefault(slot, reason)
                    couplings.frozen.setdefault(target, reason)
                    continue
                new.add(c * num // den + shift)
            new -= cuts[target]
            if new:
                cuts[target] |= new
                work.append(target)
    for blocked in couplings.blocked:
        if blocked.strided and any(cuts[slot] - {0, sizes[slot]} for slot in (blocked.coarse, blocked.fine)):
            reason = (f"'{blocked.fine[0]}' axis {blocked.fine[1]} repeats its units {blocked.outer} times "
                      "and is also cut into segments")
            couplings.frozen.setdefault(blocked.coarse, reason)
            couplings.frozen.setdefault(blocked.fine, reason)
    return {slot: sorted(c) for slot, c in cuts.items()}


#: grouped-query attention: a unit is a KV head with its query heads ("kv"), or every KV head stays
#: and query heads go, the same ones from each group ("query")
GQA_MODES = ("kv", "query")


def analyze(model: Model, gqa: str = "kv") -> Dependencies:
    """Build the groups of `model` (shapes must be inferred)."""
    if gqa not in GQA_MODES:
        raise ValueError(f"gqa must be one of {', '.join(GQA_MODES)}, got {gqa!r}")
    couplings = collect_couplings(model, gqa)
    resolve_factors(couplings)
    sizes = _slot_sizes(model, couplings)
    cuts = _refine_cuts(sizes, couplings)

    def segments_of(slot: Slot) -> list[tuple[int, int | None]]:
        points = cuts[slot]
        if not isinstance(sizes[slot], int):
            return [(0, None)]
        return list(zip(points[:-1], points[1:], strict=True))

    graph = nx.Graph()
    for slot in cuts:
        for start, stop in segments_of(slot):
            graph.add_node((slot, start), stop=stop)
    for same in couplings.same:
        seg_a, seg_b = segments_of(same.a), segments_of(same.b)
        if seg_a == seg_b:
            for start, _ in seg_a:
                graph.add_edge((same.a, start), (same.b, start))
            continue
        # a static size coupled to a symbolic one: the cuts cannot be matched, so nothing that
        # touches either slot may be pruned
        reason = f"cannot match '{same.a[0]}' axis {same.a[1]} with '{same.b[0]}' axis {same.b[1]} (unknown size)"
        for slot, segs in ((same.a, seg_a), (same.b, seg_b)):
            couplings.frozen.setdefault(slot, reason)
            for start, _ in segs:
                graph.add_edge((same.a, seg_a[0][0]), (slot, start))
    for off in couplings.offsets:
        for start, _ in segments_of(off.part):
            graph.add_edge((off.part, start), (off.whole, start + off.start))
    one = Monomial(Fraction(1))
    for blocked in couplings.blocked:
        if blocked.strided:  # a single segment on both sides (_refine_cuts froze any other case)
            outer = blocked.outer
            assert outer is not None  # a strided coupling comes from `resolve_factors`: a product's dim
            coarse, fine = (blocked.coarse, 0), (blocked.fine, 0)
            graph.add_edge(coarse, fine, ratio={coarse: (1, one), fine: (blocked.block, Monomial.of(outer))})
            continue
        for start, _ in segments_of(blocked.coarse):
            coarse, fine = (blocked.coarse, start), (blocked.fine, start * blocked.block)
            graph.add_edge(coarse, fine, ratio={coarse: (1, one), fine: (blocked.block, one)})

    order = _tensor_order(model)
    frozen_tensors = couplings.frozen_tensors
    # float initializers are weights; integer ones (sizes, indices) are sliced too when a group
    # holds them, but they neither score units nor make a group worth listing
    weights = {name for name, t in model.tensors().items()
               if isinstance(t, gs.Constant) and np.issubdtype(np.asarray(t.values).dtype, np.floating)}
    components = sorted(nx.connected_components(graph),
                        key=lambda comp: min((order.get(s[0], len(order)), s[0], s[1], start) for s, start in comp))
    groups: list[Group] = []
    segments: dict[Slot, list[Segment]] = defaultdict(list)
    for group_id, component in enumerate(components):
        members, kinds, inexact = [], [], []
        reasons: list[str] = []
        lengths = set()
        unit_lens = _unit_lengths(graph, component, reasons)
        for slot, start in sorted(component, key=lambda s: (order.get(s[0][0], len(order)), s[0][0], s[0][1], s[1])):
            stop = graph.nodes[(slot, start)].get("stop")
            name, axis = slot
            unit_len, repeats = unit_lens[(slot, start)]
            members.append(Member(name, axis, start, stop, name in weights, slot not in couplings.unscored,
                                  unit_len, repeats))
            if repeats is not None:  # a symbolic repeat count (batch) says nothing about the units
                per_unit = unit_len * repeats
                lengths.add(None if stop is None or (stop - start) % per_unit else (stop - start) // per_unit)
            segments[slot].append(Segment(start, stop, group_id, unit_len, repeats))
            for frozen_reason in (couplings.frozen.get(slot), frozen_tensors.get(name)):
                if frozen_reason and frozen_reason not in reasons:
                    reasons.append(frozen_reason)
            if slot in couplings.produced:
                kinds.append(couplings.produced[slot])
            if slot in couplings.inexact:
                inexact.append(couplings.inexact[slot])
        units = lengths.pop() if len(lengths) == 1 else None
        if len(lengths) > 0:
            reasons.append("members disagree on the number of units")
        kind = next((k for k in ("hidden", "head") if k in kinds), kinds[0] if kinds else "units")
        groups.append(Group(group_id, kind, units, tuple(members),
                            tuple(reasons[:MAX_REASONS]), exact=not inexact))
    frozen_count = sum(1 for g in groups if g.weights and g.frozen)
    logger.debug("dependency analysis: %d groups, %d with weights, %d of those frozen",
                 len(groups), sum(1 for g in groups if g.weights), frozen_count)
    return Dependencies(tuple(groups), {slot: tuple(sorted(segs)) for slot, segs in segments.items()})


def _unit_lengths(graph: nx.Graph, component: set, reasons: list[str]) -> dict:
    """(elements per unit, repeats) of every segment: 1 and 1 for the coarsest member, `block`
    times more elements across each Blocked edge and `outer` times more repeats across a strided
    one. Inconsistent factors (a cycle through different blocks) freeze the group."""
    disagree = "members disagree on the size of a unit"
    start = min(component, key=lambda n: (n[0][0], n[0][1], n[1]))
    scale = {start: (Fraction(1), Monomial(Fraction(1)))}
    stack = [start]
    while stack:
        node = stack.pop()
        for other in graph.neighbors(node):
            ratio = graph.edges[node, other].get("ratio")
            length, repeats = scale[node]
            if ratio:
                length = length * Fraction(ratio[other][0], ratio[node][0])
                repeats = repeats * ratio[other][1] / ratio[node][1]
            if other not in scale:
                scale[other] = (length, repeats)
                stack.append(other)
            elif scale[other] != (length, repeats) and disagree not in reasons:
                reasons.append(disagree)
    smallest = min(length for length, _ in scale.values())
    # the fewest repeats: the count every other member's repeats is a whole multiple of
    counts = {repeats for _, repeats in scale.values()}
    base = next((c for c in sorted(counts, key=lambda m: (len(m.powers), m.coef))
                 if all((other / c).whole for other in counts)), None)
    if base is None and disagree not in reasons:
        reasons.append(disagree)
    lengths = {}
    for node, (length, repeats) in scale.items():
        length = length / smallest
        count = (repeats / base).count if base is not None else 1
        lengths[node] = (int(length) if length.denominator == 1 else 1, count)
    return lengths


def _tensor_order(model: Model) -> dict[str, int]:
    order: dict[str, int] = {}
    for tensor in model.graph.inputs:
        order.setdefault(tensor.name, len(order))
    for node in model.graph.nodes:
        for tensor in list(node.inputs) + list(node.outputs):
            order.setdefault(tensor.name, len(order))
    return order


def render(deps: Dependencies, groups: tuple[Group, ...] | None = None) -> str:
    """Canonical text of the groups (golden tests, `inspect --members`).

    One block per group: ``group <id> <kind> units=<n> prunable|frozen: <reasons>`` then its
    members as ``tensor[axis]`` (``tensor[axis][start:stop]`` when the slot is cut into segments);
    weights are marked with ``*``.
    """
    lines = []
    for group in deps.weight_groups if groups is None else groups:
        exact = "" if group.exact else " inexact"
        lines.append(f"group {group.id} {group.kind} units={group.units}{exact} {group.status}")
        members = []
        for m in group.members:
            whole = len(deps.segments[(m.tensor, m.axis)]) == 1
            where = f"[{m.axis}]" if whole else f"[{m.axis}][{m.start}:{m.stop}]"
            where += f"x{m.unit_len}" if m.unit_len > 1 else ""
            where += "" if m.repeats == 1 else f"*{m.repeats or 'n'}"
            members.append(f"{'*' if m.is_weight else ''}{m.tensor}{where}")
        lines.append("  " + " ".join(members))
    return "\n".join(lines) + "\n"
