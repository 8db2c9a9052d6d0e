"""score-importance: one score per unit of every prunable group, aggregated over all members."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from graphprune.analysis.deps import Dependencies
from graphprune.errors import PipelineError
from graphprune.importance import SCORERS, Importance, scorer_for
from graphprune.importance.magnitude import magnitude
from graphprune.ir.model import Model
from graphprune.pipeline import AnalysisManager, AnalysisPass, register

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class ImportanceOptions:
    #: a registered criterion (`graphprune.importance.SCORERS`)
    kind: str = "l2"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SCORERS:
            raise PipelineError(f"option 'kind' of pass 'score-importance': '{self.kind}' is not one of "
                                f"{', '.join(sorted(SCORERS))}")


@register
class ScoreImportancePass(AnalysisPass):
    """Score units by their weights across the whole group.

    Reads: `analyze-deps`, the weights; for `saliency`, per-initializer arrays given by the caller
    in `am.inputs.saliency` (e.g. the Taylor terms dL/dw * w from torch autograd).
    Changes/Preserves: nothing (analysis). Result: `Importance`.
    Options: kind = l1 (sum |w|) | l2 (sqrt of sum w^2) | random (baseline, seeded) | saliency
    (|sum of the given per-weight contributions| per unit) | activation or wanda-sp (Wanda-sp:
    weights that consume the unit times its activation norms on `am.inputs.calibration`, or on
    seeded random inputs when none is given; see graphprune.importance.activation) | flap (FLAP's fluctuation:
    the variance of the unit's activations times the squared weights that consume them; the
    bias compensation is the `compensate-bias` pass, which `prune --importance flap` adds) | taylor (first-order change of the
    loss when the unit goes, by gradients through the lowered graph on the same calibration inputs:
    the task loss when `am.inputs.labels` holds labels, else the output change along random
    directions; see graphprune.importance.taylor) | fisher (the same, squared before averaging) | obs (the
    greedy order in which the consumer layer, re-fit by least squares, misses its units least:
    structured Optimal Brain Surgeon on the calibration activations, see graphprune.importance.obs; groups
    without a single MatMul/Gemm consumer get activation scores); seed.

    Every member counts: producer rows, consumer columns, biases and norm parameters, so a unit
    scores zero only when all of its weights are zero. Divisors do not count (a zero divisor makes
    a unit infinite, not dead).
    """

    name = "score-importance"
    aliases = ("importance",)
    result = Importance
    requires = (Dependencies,)
    Options = ImportanceOptions

    def run(self, model: Model, am: AnalysisManager) -> Importance:
        deps = am.get(Dependencies, model)
        kind = self.options.kind
        inputs = replace(am.inputs, seed=self.options.seed)  # the criterion's own seed
        scores = scorer_for(kind)(model, deps, kind, inputs)
        tensors = model.tensors()
        for group in deps.prunable:  # groups the criterion cannot score (no weight reads them): l2
            if group.id not in scores:
                scores[group.id] = magnitude(tensors, group, "l2")
        return Importance(kind, scores)
