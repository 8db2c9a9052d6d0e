"""sparsify-weights: unstructured magnitude pruning, zeroing small weights in place."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from graphprune.errors import OptionError
from graphprune.ir.model import Model
from graphprune.ir.weights import replacement
from graphprune.ops import unscored_inputs
from graphprune.pipeline import AnalysisManager, PassResult, RewritePass, register


@dataclass(frozen=True)
class SparsifyOptions:
    threshold: float | None = None
    sparsity: float | None = None
    min_ndim: int = 2


@register
class SparsifyWeightsPass(RewritePass):
    """Zero every weight with |w| < threshold, or the smallest `sparsity` fraction of each tensor.

    Reads: float initializers with at least `min_ndim` dims (weights, not biases or norms; never
    divisors or normalization statistics, see `OpSpec.unscored_inputs`).
    Changes: their values; shapes stay, so nothing shrinks by itself: the report gives sparsity.
    Preserves: every shape. Options: threshold (EPS >= 0) or sparsity (fraction in [0, 1)), min_ndim.
    """

    name = "sparsify-weights"
    aliases = ("sparsify",)
    Options = SparsifyOptions

    def check(self, model: Model, am: AnalysisManager) -> None:
        threshold, sparsity = self.options.threshold, self.options.sparsity
        if (threshold is None) == (sparsity is None):
            raise OptionError("sparsify needs exactly one of threshold (|w| < EPS -> 0) or sparsity (fraction)")
        if threshold is not None and (not math.isfinite(threshold) or threshold < 0):
            raise OptionError(f"weight threshold must be a finite number >= 0, got {threshold}")
        if sparsity is not None and not 0.0 <= sparsity < 1.0:
            raise OptionError(f"sparsity must be in [0, 1), got {sparsity}")

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        zeroed = total = zeros = 0
        not_weights = unscored_inputs(model.graph)
        for tensor in model.weights():
            values = np.asarray(tensor.values)
            if values.ndim < self.options.min_ndim or values.size == 0 or tensor.name in not_weights:
                continue
            magnitude = np.abs(values)
            if self.options.threshold is not None:
                mask = magnitude < self.options.threshold
            else:
                count = math.floor(values.size * self.options.sparsity)
                mask = np.zeros(values.size, dtype=bool)
                # stable order: among equal magnitudes the earlier element goes first
                mask[np.argsort(magnitude, axis=None, kind="stable")[:count]] = True
                mask = mask.reshape(values.shape)
            newly = int(np.count_nonzero(mask & (values != 0)))
            if newly:
                tensor.values = replacement(values, np.where(mask, np.zeros((), values.dtype), values))
            zeroed += newly
            total += values.size
            zeros += int(np.count_nonzero(np.asarray(tensor.values) == 0))
        sparsity = zeros / total if total else 0.0
        return PassResult(zeroed > 0, {"zeroed": zeroed, "weights": total, "sparsity": round(sparsity, 6)})
