"""score-importance: one score per unit of every prunable group, aggregated over all members."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.activation import BATCH, ActivationStatistics
from graphprune.calib import RANDOM_SAMPLES, random_calibration
from graphprune.deps import Group
from graphprune.errors import OptionError
from graphprune.ir import Model
from graphprune.obs import ObsStatistics
from graphprune.pipeline import AnalysisManager, AnalysisPass, register
from graphprune.plan import Importance, unit_rows
from graphprune.stream import collect
from graphprune.taylor import taylor_scores
from graphprune.weights import release

logger = logging.getLogger(__name__)

Kind = Literal["l1", "l2", "random", "saliency", "activation", "wanda-sp", "flap", "taylor", "fisher", "obs"]


@dataclass(frozen=True)
class ImportanceOptions:
    kind: Kind = "l2"
    seed: int = 0


def _magnitude(tensors: dict[str, gs.Tensor], group: Group, kind: str) -> np.ndarray:
    """Per-unit l1 or l2 norm over every scored member, a member at a time (a model streamed from
    disk never has more than one weight in memory here)."""
    total = np.zeros(group.units)
    for member in group.scored_weights:
        values = tensors[member.tensor].values
        rows = unit_rows(values, member).astype(np.float64)
        total += np.abs(rows).sum(axis=1) if kind == "l1" else np.square(rows).sum(axis=1)
        release(values)
    return total if kind == "l1" else np.sqrt(total)


@register
class ScoreImportancePass(AnalysisPass):
    """Score units by their weights across the whole group.

    Reads: `analyze-deps`, the weights; for `saliency`, per-initializer arrays given by the caller
    in `am.context["saliency"]` (e.g. the Taylor terms dL/dw * w from torch autograd).
    Changes/Preserves: nothing (analysis). Result: `Importance`.
    Options: kind = l1 (sum |w|) | l2 (sqrt of sum w^2) | random (baseline, seeded) | saliency
    (|sum of the given per-weight contributions| per unit) | activation or wanda-sp (Wanda-sp:
    weights that consume the unit times its activation norms on `am.context["calibration"]`, or on
    seeded random inputs when none is given; see graphprune.activation) | flap (FLAP's fluctuation:
    the variance of the unit's activations times the squared weights that consume them; the
    bias compensation is the `compensate-bias` pass, which `prune --importance flap` adds) | taylor (first-order change of the
    loss when the unit goes, by gradients through the lowered graph on the same calibration inputs:
    the task loss when `am.context["labels"]` holds labels, else the output change along random
    directions; see graphprune.taylor) | fisher (the same, squared before averaging) | obs (the
    greedy order in which the consumer layer, re-fit by least squares, misses its units least:
    structured Optimal Brain Surgeon on the calibration activations, see graphprune.obs; groups
    without a single MatMul/Gemm consumer get activation scores); seed.

    Every member counts: producer rows, consumer columns, biases and norm parameters, so a unit
    scores zero only when all of its weights are zero. Divisors do not count (a zero divisor makes
    a unit infinite, not dead).
    """

    name = "score-importance"
    aliases = ("importance",)
    Options = ImportanceOptions

    def run(self, model: Model, am: AnalysisManager) -> Importance:
        deps = am.get("analyze-deps", model)
        kind = self.options.kind
        rng = np.random.default_rng(self.options.seed)
        saliency = am.context.get("saliency") if kind == "saliency" else None
        if kind == "saliency" and not saliency:
            raise OptionError("importance kind 'saliency' needs per-weight contributions "
                              "(pass saliency=... to graphprune.prune)")
        tensors = model.tensors()
        scores: dict[int, np.ndarray] = {}
        if kind in ("activation", "wanda-sp", "flap", "taylor", "fisher", "obs"):
            feeds = am.context.get("calibration")
            if feeds is None:
                logger.info("no calibration data: %s scores use %d seeded random samples", kind, RANDOM_SAMPLES)
                feeds = random_calibration(model.to_onnx(), seed=self.options.seed)
            if kind in ("activation", "wanda-sp", "flap", "obs"):
                obs = ObsStatistics(model, deps) if kind == "obs" else None
                # activation scores for the groups OBS does not cover, from the same pass over the data
                activation = ActivationStatistics(model, deps, skip=set(obs.chosen) if obs else (),
                                                  statistic="fluctuation" if kind == "flap" else "norm")
                collect(model, feeds, [c for c in (obs, activation) if c is not None], BATCH)
                scores = (obs.scores() if obs else {}) | activation.scores()
            else:
                scores = taylor_scores(model, deps, feeds, seed=self.options.seed, squared=kind == "fisher",
                                       labels=am.context.get("labels"))
        for group in deps.prunable:
            if group.id in scores:
                continue
            if kind == "random":
                scores[group.id] = rng.random(group.units)
                continue
            if kind == "saliency":
                terms = [unit_rows(np.asarray(saliency[m.tensor], np.float64), m) for m in group.scored_weights if m.tensor in saliency]
                if not terms:
                    logger.warning("group %d has no saliency for any member; scoring it by l2", group.id)
                    scores[group.id] = _magnitude(tensors, group, "l2")
                else:
                    scores[group.id] = np.abs(sum(t.sum(axis=1) for t in terms))
                continue
            magnitude = "l1" if kind == "l1" else "l2"  # activation: groups no weight reads fall back to l2
            scores[group.id] = _magnitude(tensors, group, magnitude)
        return Importance(kind, scores)

