"""prune-units: physically remove the lowest-scored units of every prunable group."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from graphprune import runtime
from graphprune.analysis import cost
from graphprune.analysis.deps import Dependencies
from graphprune.errors import OptionError
from graphprune.importance import Importance
from graphprune.ir.model import Model
from graphprune.pipeline import AnalysisManager, PassResult, RewritePass, register
from graphprune.tools.bench import relative_latency
from graphprune.transform.plan import kind_ratios, make_plan, validate_budget
from graphprune.transform.rewrite import apply_plan, kept_indices

#: dry runs when searching the ratio for a parameter or FLOP target (0.99 / 2^10 < 0.001)
BISECTION_STEPS = 10
#: timed dry runs for a latency target (each one a few seconds; 0.99 / 2^7 < 0.008)
LATENCY_BISECTION_STEPS = 7
#: samples (or dynamic dims) and ORT threads of the latency measurement
LATENCY_SAMPLES = 8
LATENCY_THREADS = 2


def latency_fraction(reference, trial: Model, feeds: dict, runs: int) -> float:
    """Median ORT latency of `trial` over that of the `reference` session, timed in turns."""
    return relative_latency(reference, runtime.session(trial.to_onnx(), threads=LATENCY_THREADS), feeds, runs=runs)


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
    target_params: float | None = None  # fraction of the parameters to keep (replaces ratio)
    target_flops: float | None = None  # fraction of the FLOPs to keep (replaces ratio)
    target_latency: float | None = None  # fraction of the dense ORT latency (replaces ratio)
    latency_runs: int = 15  # timed runs per candidate for target_latency
    uniform_heads: bool = False  # global allocation: one head count in every layer


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
    max_group_ratio of a group; uniform_heads: every layer keeps the same head count, for runtimes
    whose config has one); head_ratio, neuron_ratio, channel_ratio (per-kind ratios that
    replace `ratio` for those groups); target_params / target_flops / target_latency (keep about this
    fraction of the parameters / FLOPs / ORT CPU latency: the ratio is found by bisection on dry runs,
    and the result reported; latency is timed against the dense model in turns, latency_runs runs
    each, on the first LATENCY_SAMPLES calibration samples or else on random inputs with dynamic dims
    of LATENCY_SAMPLES).
    Never removes every unit.
    """

    name = "prune-units"
    aliases = ("prune",)
    Options = PruneOptions

    @property
    def lossless(self) -> bool:
        return self.options.threshold == 0

    def _target(self) -> tuple[str, float] | None:
        given = [(k, v) for k, v in (("params", self.options.target_params), ("flops", self.options.target_flops),
                                     ("latency", self.options.target_latency)) if v is not None]
        if len(given) > 1:
            raise OptionError("give only one of target_params, target_flops and target_latency")
        return given[0] if given else None

    def check(self, model: Model, am: AnalysisManager) -> None:
        target = self._target()
        if target is None:
            validate_budget(self.options.ratio, self.options.threshold, self.options.round_to)
            return
        if self.options.ratio is not None or self.options.threshold is not None:
            raise OptionError(f"target_{target[0]} replaces ratio and threshold; give one of them")
        if not 0 < target[1] < 1:
            raise OptionError(f"target_{target[0]} is the fraction kept, in (0, 1); got {target[1]}")

    def _plan(self, deps: Dependencies, importance, ratio: float | None, warn: bool = False):
        return make_plan(deps, importance, ratio, self.options.threshold, self.options.round_to,
                         self.options.round_mode, self.options.hidden, self.options.allocation,
                         self.options.max_group_ratio, self._kind_ratios(), self.options.uniform_heads, warn)

    def _measure(self, model: Model, am: AnalysisManager, measure: str) -> Callable[[Model], float]:
        """The fraction of the dense model's cost a pruned copy keeps: counted, or timed in ORT."""
        if measure != "latency":
            dense = max(getattr(cost.totals(model), measure), 1)
            return lambda trial: getattr(cost.totals(trial), measure) / dense
        proto = model.to_onnx()
        calibration = am.inputs.calibration
        if calibration is not None:
            feeds = {name: array[:LATENCY_SAMPLES] for name, array in calibration.items()}
        else:
            feeds = runtime.sample_inputs(proto, seed=am.inputs.seed, dynamic_dim=LATENCY_SAMPLES)
        reference = runtime.session(proto, threads=LATENCY_THREADS)
        return lambda trial: latency_fraction(reference, trial, feeds, self.options.latency_runs)

    def _ratio_for_target(self, model: Model, am: AnalysisManager, deps: Dependencies, importance, measure: str,
                          fraction: float) -> tuple[float, float]:
        """Bisect the ratio whose pruned model keeps about `fraction` of the dense cost (dry runs on
        copies); returns the ratio and the fraction it reaches: never below the target for counted
        costs, the closest measured for latency (timings are noisy, not monotonic)."""
        measured = self._measure(model, am, measure)

        def kept(ratio: float) -> float:
            trial = model.copy()
            plan = self._plan(deps, importance, ratio)
            if plan.kept:
                apply_plan(trial, deps, plan)
            return measured(trial)

        low, high = 0.0, 0.99
        reached_high = kept(high)
        if reached_high > fraction:
            return high, reached_high  # the closest this model can get: frozen units stay
        tried = [(high, reached_high)]
        for _ in range(LATENCY_BISECTION_STEPS if measure == "latency" else BISECTION_STEPS):
            middle = (low + high) / 2
            reached = kept(middle)
            tried.append((middle, reached))
            if reached >= fraction:
                low = middle
            else:
                high = middle
        if measure == "latency":
            return min(tried, key=lambda t: abs(t[1] - fraction))
        return max(((r, f) for r, f in tried if f >= fraction), default=(0.0, 1.0))

    def _kind_ratios(self) -> dict[str, float]:
        return kind_ratios(self.options.head_ratio, self.options.neuron_ratio, self.options.channel_ratio)

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        deps = am.get(Dependencies, model)
        importance = am.get(Importance, model)
        if self.lossless:
            # exact removal only: a zero unit still shifts a normalization's mean and variance
            deps = replace(deps, groups=tuple(g if g.exact else replace(g, frozen=("inexact",))
                                              for g in deps.groups))
        if am.state.keep_unpruned:  # a later `reconstruct` fits against the model as it was
            am.state.unpruned = model.copy()
        ratio, target_stats = self.options.ratio, {}
        target = self._target()
        if target is not None:
            measure, fraction = target
            ratio, reached = self._ratio_for_target(model, am, deps, importance, measure, fraction)
            target_stats = {f"target_{measure}": fraction, f"reached_{measure}": round(reached, 4),
                            "ratio": round(ratio, 4)}
        plan = self._plan(deps, importance, ratio, warn=True)
        if not plan.kept:
            return PassResult(False, {"groups_pruned": 0, "units_removed": 0, **target_stats})
        if am.state.keep_unpruned:  # which elements stayed, for the refit targets
            am.state.kept = kept_indices(deps, plan)
        stats = apply_plan(model, deps, plan) | target_stats
        stats["group_units"] = {gid: len(kept) for gid, kept in plan.kept.items()}
        return PassResult(True, stats)
