"""Weight-only criteria: L1 / L2 magnitude over every member of a group, a seeded random baseline,
and caller-given per-weight saliency (e.g. Taylor terms from the user's own autograd)."""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis.deps import Dependencies, Group
from graphprune.errors import OptionError
from graphprune.importance.base import register_scorer, unit_rows
from graphprune.inputs import PassInputs
from graphprune.ir.model import Model
from graphprune.ir.weights import release

logger = logging.getLogger(__name__)


def magnitude(tensors: dict[str, gs.Tensor], group: Group, kind: str) -> np.ndarray:
    """Per-unit l1 or l2 norm over every scored member, a member at a time (a model streamed from
    disk never has more than one weight in memory here)."""
    total = np.zeros(group.unit_count)
    for member in group.scored_weights:
        values = tensors[member.tensor].values
        rows = unit_rows(values, member).astype(np.float64)
        total += np.abs(rows).sum(axis=1) if kind == "l1" else np.square(rows).sum(axis=1)
        release(values)
    return total if kind == "l1" else np.sqrt(total)


class Magnitude:
    """l1: sum |w|; l2: sqrt of sum w^2, over producer rows, consumer columns, biases and norm
    parameters: a unit scores zero only when all of its weights are zero."""

    kinds: ClassVar[tuple[str, ...]] = ("l1", "l2")

    def __call__(self, model: Model, deps: Dependencies, kind: str, inputs: PassInputs) -> dict[int, np.ndarray]:
        tensors = model.tensors()
        return {group.id: magnitude(tensors, group, kind) for group in deps.prunable}


class Random:
    """A seeded random baseline."""

    kinds: ClassVar[tuple[str, ...]] = ("random",)

    def __call__(self, model: Model, deps: Dependencies, kind: str, inputs: PassInputs) -> dict[int, np.ndarray]:
        rng = np.random.default_rng(inputs.seed)
        return {group.id: rng.random(group.units) for group in deps.prunable}


class Saliency:
    """|sum of the given per-weight contributions| per unit; a group with none is scored by l2."""

    kinds: ClassVar[tuple[str, ...]] = ("saliency",)

    def __call__(self, model: Model, deps: Dependencies, kind: str, inputs: PassInputs) -> dict[int, np.ndarray]:
        saliency = inputs.saliency
        if not saliency:
            raise OptionError("importance kind 'saliency' needs per-weight contributions "
                              "(pass saliency=... to graphprune.prune)")
        tensors = model.tensors()
        scores = {}
        for group in deps.prunable:
            terms = [unit_rows(np.asarray(saliency[m.tensor], np.float64), m) for m in group.scored_weights
                     if m.tensor in saliency]
            if not terms:
                logger.warning("group %d has no saliency for any member; scoring it by l2", group.id)
                scores[group.id] = magnitude(tensors, group, "l2")
            else:
                scores[group.id] = np.abs(sum(t.sum(axis=1) for t in terms))
        return scores


register_scorer(Magnitude())
register_scorer(Random())
register_scorer(Saliency())
