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
from collections.abc import Collection, Mapping
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis.deps import Dependencies, Group, Member
from graphprune.calib import positions
from graphprune.importance.base import calibration_feeds, register_scorer
from graphprune.inputs import PassInputs
from graphprune.ir.model import Model
from graphprune.ops import CALIBRATED_OPS
from graphprune.stream import collect

logger = logging.getLogger(__name__)

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
            if node.op not in CALIBRATED_OPS:
                continue
            for other in node.inputs[1:2]:
                weight = weights.get(other.name)
                if weight is not None and isinstance(other, gs.Constant) and \
                        weight.length == member.stop - member.start:
                    pairs.append((member, weight))
    return pairs


def _element_weight_sums(values: np.ndarray, member: Member, power: int = 1) -> np.ndarray:
    """sum_i |W_ij|^power for every element j of the member's segment."""
    part = np.take(np.abs(np.asarray(values, np.float64)), np.arange(member.start, member.stop), axis=member.axis)
    return (np.moveaxis(part, member.axis, 0).reshape(member.length, -1) ** power).sum(axis=1)


#: what `activation_scores` measures of an activation element: its L2 norm or its variance
STATISTICS = ("norm", "fluctuation")


class ActivationStatistics:
    """Accumulates the activation statistic of every prunable group with consumer pairs (and not in
    `skip`) from the tensors in `tensors`, batch by batch (`add`); `scores` then scores them."""

    def __init__(self, model: Model, deps: Dependencies, skip: Collection[int] = (), statistic: str = "norm") -> None:
        self.model, self.deps, self.statistic = model, deps, statistic
        self.pairs = {g.id: consumer_pairs(model, g) if g.id not in skip else [] for g in deps.prunable}
        self.tensors = {a.tensor for group_pairs in self.pairs.values() for a, _ in group_pairs}
        self.axes: dict[str, set[int]] = defaultdict(set)
        for group_pairs in self.pairs.values():
            for act, _ in group_pairs:
                self.axes[act.tensor].add(act.axis)
        self.squares: dict[str, np.ndarray] = {}
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, float] = {}

    def add(self, batch: dict[str, np.ndarray], values: dict[str, np.ndarray]) -> None:
        for name, value in values.items():
            if name not in self.tensors:
                continue
            value = np.asarray(value, np.float64)
            mask = positions(batch, value)
            if mask is not None:  # padding positions count as zero
                value = value * mask.reshape(mask.shape + (1,) * (value.ndim - 2))
            for axis in self.axes[name]:
                rows = np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)
                key = f"{name}#{axis}"
                self.squares[key] = self.squares.get(key, 0) + np.square(rows).sum(axis=1)
                if self.statistic == "fluctuation":
                    self.sums[key] = self.sums.get(key, 0) + rows.sum(axis=1)
                    # positions counted: all but the padding ones
                    counted = rows.shape[1] if mask is None else float(np.sum(mask)) * rows.shape[1] / mask.size
                    self.counts[key] = self.counts.get(key, 0.0) + counted

    def scores(self) -> dict[int, np.ndarray]:
        consts = self.model.constants()
        scores: dict[int, np.ndarray] = {}
        for group in self.deps.prunable:
            if not self.pairs[group.id]:
                continue
            units = group.unit_count
            total = np.zeros(units)
            for act, weight in self.pairs[group.id]:
                key = f"{act.tensor}#{act.axis}"
                if self.statistic == "fluctuation":
                    count = max(self.counts[key], 1.0)
                    mean = self.sums[key][act.start:act.stop] / count
                    spread = np.maximum(self.squares[key][act.start:act.stop] / count - np.square(mean), 0.0)
                    contribution = spread * _element_weight_sums(consts[weight.tensor].values, weight, power=2)
                else:
                    norms = np.sqrt(self.squares[key][act.start:act.stop])
                    contribution = norms * _element_weight_sums(consts[weight.tensor].values, weight)
                if act.repeats == 1:
                    total += contribution.reshape(units, -1).sum(axis=1)
                else:  # [repeats, units, unit_len] (packed QKV): every repeat of a unit counts
                    total += contribution.reshape(act.repeats, units, -1).sum(axis=(0, 2))
            scores[group.id] = total
        logger.debug("activation scores for %d of %d groups", len(scores), len(self.deps.prunable))
        return scores


def activation_scores(model: Model, deps: Dependencies, feeds: Mapping[str, np.ndarray],
                      skip: Collection[int] = (), statistic: str = "norm") -> dict[int, np.ndarray]:
    """Scores for every prunable group that has consumer pairs (and is not in `skip`); other groups
    are left out. `statistic`: see the module doc."""
    statistics = ActivationStatistics(model, deps, skip, statistic)
    collect(model, feeds, [statistics], BATCH)
    return statistics.scores()


class Activation:
    """activation / wanda-sp: the "norm" statistic; flap: the "fluctuation" one (see the module doc)."""

    kinds: ClassVar[tuple[str, ...]] = ("activation", "wanda-sp", "flap")

    def __call__(self, model: Model, deps: Dependencies, kind: str, inputs: PassInputs) -> dict[int, np.ndarray]:
        feeds = calibration_feeds(model, inputs, kind)
        return activation_scores(model, deps, feeds, statistic="fluctuation" if kind == "flap" else "norm")


register_scorer(Activation())
