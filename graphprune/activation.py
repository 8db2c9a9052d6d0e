"""Activation-aware importance, forward only through ONNX Runtime.

`statistic="norm"` (Wanda-sp, `--importance activation` or `wanda-sp`): a unit's score is
sum_j ||X_j|| * sum_i |W_ij| over the elements j of the unit, for every weight W that consumes one
of the group's activations X (a MatMul/Gemm/Conv reading X with a weight of the same group): a
unit matters when large weights meet large activations. ||X_j|| is the L2 norm of element j over
every calibration sample and position (padding positions of text inputs left out:
`calib.positions`).

`statistic="fluctuation"` (FLAP's metric, `--importance flap`): sum_j Var(X_j) * sum_i W_ij^2,
the variance of element j over the calibration positions: what the next layer loses when the unit
is replaced by its mean (a constant the bias could absorb) rather than by zero.

Groups without such a pair (no weight reads their activations) fall back to the L2 magnitude of
their weights.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Collection

import numpy as np
import onnx_graphsurgeon as gs

from graphprune import runtime
from graphprune.calib import batches, dynamic_sequence, positions
from graphprune.deps import Dependencies, Group, Member
from graphprune.ir import Model

logger = logging.getLogger(__name__)

CONSUMERS = frozenset({"MatMul", "Gemm", "Conv"})
BATCH = 16


def consumer_pairs(model: Model, group: Group) -> list[tuple[Member, Member]]:
    """(activation member, weight member) pairs where a weight of the group consumes the activation."""
    tensors = model.tensors()
    weights = {m.tensor: m for m in group.scored_weights}
    pairs = []
    for member in group.members:
        tensor = tensors.get(member.tensor)  # virtual slots (conv groups) are no tensor
        if member.is_weight or member.stop is None or tensor is None:
            continue
        for node in tensor.outputs:
            if node.op not in CONSUMERS:
                continue
            for other in node.inputs[1:2]:
                weight = weights.get(other.name)
                if weight is not None and isinstance(other, gs.Constant) and \
                        weight.stop - weight.start == member.stop - member.start:
                    pairs.append((member, weight))
    return pairs


def _element_weight_sums(values: np.ndarray, member: Member, power: int = 1) -> np.ndarray:
    """sum_i |W_ij|^power for every element j of the member's segment."""
    part = np.take(np.abs(np.asarray(values, np.float64)), np.arange(member.start, member.stop), axis=member.axis)
    return (np.moveaxis(part, member.axis, 0).reshape(member.stop - member.start, -1) ** power).sum(axis=1)


#: what `activation_scores` measures of an activation element: its L2 norm or its variance
STATISTICS = ("norm", "fluctuation")


def activation_scores(model: Model, deps: Dependencies, feeds: dict[str, np.ndarray],
                      skip: Collection[int] = (), statistic: str = "norm") -> dict[int, np.ndarray]:
    """Scores for every prunable group that has consumer pairs (and is not in `skip`); other groups
    are left out. `statistic`: see the module doc."""
    pairs = {g.id: consumer_pairs(model, g) if g.id not in skip else [] for g in deps.prunable}
    needed = {a.tensor for group_pairs in pairs.values() for a, _ in group_pairs}
    if not needed:
        return {}
    tensors = model.tensors()
    proto = runtime.with_outputs(model.to_onnx(), {name: tensors[name].dtype for name in needed})
    names = sorted(needed)
    session = runtime.session(proto, threads=2)
    squares: dict[str, np.ndarray] = {}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, float] = {}
    members = defaultdict(set)
    for group_pairs in pairs.values():
        for act, _ in group_pairs:
            members[act.tensor].add(act.axis)
    for batch in batches(feeds, BATCH, trim=dynamic_sequence(proto)):
        for name, value in zip(names, session.run(names, batch), strict=True):
            value = np.asarray(value, np.float64)
            mask = positions(batch, value)
            if mask is not None:  # padding positions count as zero
                value = value * mask.reshape(mask.shape + (1,) * (value.ndim - 2))
            for axis in members[name]:
                rows = np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)
                key = f"{name}#{axis}"
                squares[key] = squares.get(key, 0) + np.square(rows).sum(axis=1)
                if statistic == "fluctuation":
                    sums[key] = sums.get(key, 0) + rows.sum(axis=1)
                    # positions counted: all but the padding ones
                    counted = rows.shape[1] if mask is None else float(np.sum(mask)) * rows.shape[1] / mask.size
                    counts[key] = counts.get(key, 0.0) + counted
    consts = model.constants()
    scores: dict[int, np.ndarray] = {}
    for group in deps.prunable:
        if not pairs[group.id]:
            continue
        total = np.zeros(group.units)
        for act, weight in pairs[group.id]:
            key = f"{act.tensor}#{act.axis}"
            if statistic == "fluctuation":
                count = max(counts[key], 1.0)
                mean = sums[key][act.start:act.stop] / count
                spread = np.maximum(squares[key][act.start:act.stop] / count - np.square(mean), 0.0)
                contribution = spread * _element_weight_sums(consts[weight.tensor].values, weight, power=2)
            else:
                norms = np.sqrt(squares[key][act.start:act.stop])
                contribution = norms * _element_weight_sums(consts[weight.tensor].values, weight)
            if act.repeats == 1:
                total += contribution.reshape(group.units, -1).sum(axis=1)
            else:  # [repeats, units, unit_len] (packed QKV): every repeat of a unit counts
                total += contribution.reshape(act.repeats, group.units, -1).sum(axis=(0, 2))
        scores[group.id] = total
    logger.debug("activation scores for %d of %d groups", len(scores), len(deps.prunable))
    return scores
