"""analyze-deps: the dependency analysis that turns coupled slots into pruning groups."""

from __future__ import annotations

from graphprune.deps import Dependencies, analyze
from graphprune.ir import Model
from graphprune.pipeline import AnalysisManager, AnalysisPass, register


@register
class AnalyzeDepsPass(AnalysisPass):
    """Group every (tensor, axis) slot with the slots that must lose the same units.

    Reads: the graph with inferred shapes. Changes/Preserves: nothing (analysis). Result: `Dependencies` (groups with
    members, kind, unit count, frozen reasons). Options: none. See graphprune.deps and the rule
    table in graphprune.rules.
    """

    name = "analyze-deps"
    aliases = ("deps",)

    def run(self, model: Model, am: AnalysisManager) -> Dependencies:
        return analyze(model)
