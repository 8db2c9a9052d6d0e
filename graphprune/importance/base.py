"""The scorer contract: a criterion scores the units of every prunable group it can.

A scorer is an object registered under one or more `--importance` kinds; called with the model,
its dependencies and the caller's `PassInputs`, it returns {group id: one score per unit (higher = more
important)} for the groups it can score. The `score-importance` pass gives the groups it leaves
out their L2 magnitude. Calibrated scorers read `inputs.calibration` (seeded random samples when
none are given: `calibration_feeds`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from graphprune.analysis.deps import Dependencies, Member
from graphprune.calib import RANDOM_SAMPLES, random_calibration
from graphprune.inputs import PassInputs
from graphprune.ir.model import Model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Importance:
    """One score per unit for every prunable group (higher = more important)."""

    kind: str
    scores: Mapping[int, np.ndarray]

    @property
    def stats(self) -> dict[str, object]:
        return {"kind": self.kind, "groups_scored": len(self.scores)}


class Scorer(Protocol):
    #: the `--importance` kinds this scorer answers to
    kinds: ClassVar[tuple[str, ...]]

    def __call__(self, model: Model, deps: Dependencies, kind: str, inputs: PassInputs) -> dict[int, np.ndarray]:
        ...


SCORERS: dict[str, Scorer] = {}


def register_scorer(scorer: Scorer) -> Scorer:
    for kind in scorer.kinds:
        if kind in SCORERS:
            raise ValueError(f"importance kind {kind!r} is registered twice")
        SCORERS[kind] = scorer
    return scorer


def unit_rows(values: np.ndarray, member: Member) -> np.ndarray:
    """A member's per-element array (weights, gradients...) as [units, elements-per-unit]."""
    if member.stop is None:
        raise ValueError(f"'{member.tensor}' axis {member.axis}: a weight member needs a static size")
    units = (member.stop - member.start) // (member.unit_len * (member.repeats or 1))
    part = np.take(np.asarray(values), member.unit_elements(np.arange(units), units), axis=member.axis)
    return np.moveaxis(part, member.axis, 0).reshape(units, -1)


def calibration_feeds(model: Model, inputs: PassInputs, kind: str) -> Mapping[str, np.ndarray]:
    """The calibration feeds, or seeded random samples (logged) when none were given."""
    if inputs.calibration is not None:
        return inputs.calibration
    logger.info("no calibration data: %s scores use %d seeded random samples", kind, RANDOM_SAMPLES)
    return random_calibration(model.to_onnx(), seed=inputs.seed)
