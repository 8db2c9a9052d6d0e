"""The op registry: each op type registered once, with everything graphprune knows about it.

    register("Conv", rule=conv, fixup=fix_conv, lowering=lower_conv, cost=conv_macs, tags={"weighted"})

`spec_of(node)` finds a node's entry (ONNX domain or com.microsoft); an op without one has no rule
(it freezes what it touches), no lowering (lowering refuses the graph naming it) and costs one FLOP
per output element. `ops_tagged(tag)` names an op set once for every reader (weighted consumers,
reductions, pools...).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from graphprune.ops.base import CostRule, Fixup, Rule

#: the domains ops are registered in: ONNX's ("" or "ai.onnx") and ONNX Runtime's contrib ops
DOMAINS = ("", "com.microsoft")


@dataclass(frozen=True)
class OpSpec:
    op: str
    domain: str = ""
    #: how the op couples its inputs' and outputs' axes; None freezes every slot it touches
    rule: Rule | None = None
    #: updates size-carrying constants and attributes after slicing
    fixup: Fixup | None = None
    #: torch function of (inputs..., **attributes); None: the op cannot be lowered
    lowering: Callable | None = None
    #: multiply-accumulates of a node, or base.FREE / base.ELEMENTWISE
    cost: CostRule | None = None
    #: the lowering returns one value per ONNX output
    multi_output: bool = False
    #: inputs the lowering takes under a keyword (the attribute twins of older opsets)
    keyword_inputs: Mapping[int, str] = field(default_factory=dict)
    #: adjusts the lowering's keyword attributes: (node, attributes, opset) -> None
    attributes: Callable[[gs.Node, dict, int], None] | None = None
    #: inputs that do not weigh a unit's contribution (a divisor, BatchNorm statistics): importance
    #: ignores them and unstructured pruning never zeroes them
    unscored_inputs: tuple[int, ...] = ()
    tags: frozenset[str] = frozenset()
    #: why the op has no rule or lowering, for the freeze reason and the lowering error
    note: str = ""


REGISTRY: dict[tuple[str, str], OpSpec] = {}


def register(op: str, domain: str = "", *, tags: set[str] | frozenset[str] = frozenset(), **fields) -> OpSpec:
    """Register `op` once; a second registration of the same (domain, op) is a programming error."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r} for {op}")
    if (domain, op) in REGISTRY:
        raise ValueError(f"{domain or 'ai.onnx'}::{op} is registered twice")
    spec = REGISTRY[(domain, op)] = OpSpec(op, domain, tags=frozenset(tags), **fields)
    return spec


def lookup(op: str, domain: str | None = "") -> OpSpec | None:
    domain = "" if domain in (None, "ai.onnx") else domain
    return REGISTRY.get((domain, op))


def spec_of(node: gs.Node) -> OpSpec | None:
    return lookup(node.op, node.domain)


def ops_tagged(tag: str, domain: str = "") -> frozenset[str]:
    """The op types of `domain` registered with `tag`."""
    return frozenset(op for (d, op), spec in REGISTRY.items() if d == domain and tag in spec.tags)


def unscored_inputs(graph: gs.Graph) -> set[str]:
    """Names of the tensors that registered ops designate as unscored anywhere in `graph`."""
    names = set()
    for node in graph.nodes:
        spec = spec_of(node)
        for index in spec.unscored_inputs if spec else ():
            if index < len(node.inputs):
                names.add(node.inputs[index].name)
    return names
