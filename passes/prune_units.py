"""prune-units: physically remove the lowest-scored units of every prunable group."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from graphprune.deps import Dependencies
from graphprune.ir import Model
from graphprune.pipeline import AnalysisManager, PassResult, RewritePass, register
from graphprune.plan import make_plan, validate_budget
from graphprune.rewrite import apply_plan


@dataclass(frozen=True)
class PruneOptions:
    ratio: float | None = None
    threshold: float | None = None
    round_to: int | None = None
    round_mode: Literal["up", "down"] = "up"
    hidden: bool = False
    allocation: Literal["uniform", "global"] = "uniform"
    max_group_ratio: float = 0.9
    head_ratio: float | None = None
    neuron_ratio: float | None = None
    channel_ratio: float | None = None


@register
class PruneUnitsPass(RewritePass):
    """Delete units from every tensor of their group, by ratio or by importance threshold.

    Reads: `analyze-deps`, `score-importance`. Changes: slices weights of every member, fixes
    Split sizes and Slice bounds, re-infers shapes. Preserves: graph inputs/outputs and their
    shapes; with `threshold=0`, the outputs (lossless: only units whose every weight is zero go,
    and only from groups where such a unit contributes nothing, i.e. not normalized over).
    Options: ratio (fraction of units removed in each group, [0, 1)) or threshold (remove units
    scoring <= threshold); round_to (kept counts are multiples of it; default: 8 for groups of 32+
    units, which ORT's CPU kernels run fastest, 1 below); round_mode (up: never remove more than
    the ratio; down: Torch-Pruning's convention, remove at least the ratio); hidden (also prune the
    residual stream: the group of normalized feature axes, off by default); allocation (uniform: the
    ratio in every group; global: units of a kind compete across groups by normalized score, at most
    max_group_ratio of a group); head_ratio, neuron_ratio, channel_ratio (per-kind ratios that
    replace `ratio` for those groups). Never removes every unit.
    """

    name = "prune-units"
    aliases = ("prune",)
    Options = PruneOptions

    @property
    def lossless(self) -> bool:
        return self.options.threshold == 0

    def check(self, model: Model, am: AnalysisManager) -> None:
        validate_budget(self.options.ratio, self.options.threshold, self.options.round_to)

    def _kind_ratios(self) -> dict[str, float]:
        given = {"head": self.options.head_ratio, "neuron": self.options.neuron_ratio,
                 "channel": self.options.channel_ratio}
        return {kind: value for kind, value in given.items() if value is not None}

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        deps: Dependencies = am.get("analyze-deps", model)
        importance = am.get("score-importance", model)
        if self.lossless:
            # exact removal only: a zero unit still shifts a normalization's mean and variance
            deps = replace(deps, groups=tuple(g if g.exact else replace(g, frozen=("inexact",))
                                              for g in deps.groups))
        if am.context.get("keep_unpruned"):  # a later `reconstruct` fits against the model as it was
            am.context["unpruned"] = model.copy()
        plan = make_plan(deps, importance, self.options.ratio, self.options.threshold, self.options.round_to,
                         self.options.round_mode, self.options.hidden, self.options.allocation,
                         self.options.max_group_ratio, self._kind_ratios())
        if not plan.kept:
            return PassResult(False, {"groups_pruned": 0, "units_removed": 0})
        stats = apply_plan(model, deps, plan)
        stats["group_units"] = {gid: len(kept) for gid, kept in plan.kept.items()}
        return PassResult(True, stats)
