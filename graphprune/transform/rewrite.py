"""Apply a plan: slice every member tensor, then fix the ops whose constants describe sizes.

Weights are sliced along each member axis. Activations need nothing: their shapes are
re-inferred. Ops that carry sizes or offsets as constants (Split sizes, Slice bounds) are fixed
by their registered fixup (`graphprune.ops`); fixed constants are always *new* tensors, so a
constant shared with another node never changes under it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from fractions import Fraction

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis.deps import Dependencies, segment_elements
from graphprune.ir.model import Model
from graphprune.ir.weights import replacement
from graphprune.ops import spec_of
from graphprune.ops.base import RewriteContext, Slot
from graphprune.transform.plan import Plan

logger = logging.getLogger(__name__)


def size_ratios(deps: Dependencies, plan: Plan) -> dict[Slot, Fraction]:
    """New size / old size of every slot that loses units, also where the size is symbolic: a
    [batch * heads] axis keeps kept/units of its elements."""
    ratios = {}
    for slot, segments in deps.segments.items():
        if not any(seg.group in plan.kept for seg in segments):
            continue
        if all(seg.static for seg in segments):
            old = sum(seg.length for seg in segments)
            new = sum(len(plan.kept[seg.group]) * seg.unit_len * seg.repeat_count if seg.group in plan.kept
                      else seg.length for seg in segments)
            ratios[slot] = Fraction(new, old)
        elif len(segments) == 1:
            only = segments[0]
            ratios[slot] = Fraction(len(plan.kept[only.group]), deps.group(only.group).unit_count)
    return ratios


def kept_indices(deps: Dependencies, plan: Plan) -> dict[Slot, np.ndarray]:
    """Element indices kept along every slot that loses units (each unit is `unit_len` elements,
    repeated `repeats` times). A slot of symbolic size (batch * heads) is left out: it is an
    activation, whose size follows from the weights, and no literal can give it."""
    kept: dict[Slot, np.ndarray] = {}
    for slot, segments in deps.segments.items():
        if not any(seg.group in plan.kept for seg in segments):
            continue
        if not all(seg.static for seg in segments):
            continue
        parts = [np.sort(segment_elements(seg.start, plan.kept[seg.group], deps.group(seg.group).unit_count,
                                          seg.unit_len, seg.repeat_count))
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


def apply_plan(model: Model, deps: Dependencies, plan: Plan) -> dict[str, object]:
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
        spec = spec_of(node)
        if spec is not None and spec.fixup is not None:
            spec.fixup(node, ctx)
    model.graph.toposort()  # copied shape chains were appended at the end
    model.infer_shapes()
    stats: dict[str, object] = {
        "groups_pruned": len(plan.kept),
        "units_removed": plan.removed(deps),
        "tensors_sliced": sliced,
        "params_removed": params_before - model.param_count(),
    }
    if resized:
        stats["state"] = resized
    logger.info("pruned %(units_removed)d units in %(groups_pruned)d groups", stats)
    return stats
