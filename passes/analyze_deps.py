"""analyze-deps: the dependency analysis that turns coupled slots into pruning groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from graphprune.analysis.deps import Dependencies, analyze
from graphprune.ir.model import Model
from graphprune.pipeline import AnalysisManager, AnalysisPass, register


@dataclass(frozen=True)
class DepsOptions:
    gqa: Literal["kv", "query"] = "kv"


@register
class AnalyzeDepsPass(AnalysisPass):
    """Group every (tensor, axis) slot with the slots that must lose the same units.

    Reads: the graph with inferred shapes. Changes/Preserves: nothing (analysis). Result: `Dependencies` (groups with
    members, kind, unit count, frozen reasons). Options: gqa = kv (grouped-query attention loses
    whole KV heads, each with its query heads) | query (every KV head stays; each KV head loses the
    same query heads, so a 9-query / 3-KV-head model can go to 6 query heads). See graphprune.analysis.deps
    and the op rules in graphprune.ops.
    """

    name = "analyze-deps"
    aliases = ("deps",)
    result = Dependencies
    Options = DepsOptions

    def run(self, model: Model, am: AnalysisManager) -> Dependencies:
        return analyze(model, self.options.gqa)
