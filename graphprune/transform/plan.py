"""Importance results and pruning plans: which units of each group are kept."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from graphprune.analysis.deps import OPT_IN_KINDS, Dependencies, Group
from graphprune.errors import OptionError
from graphprune.importance.base import Importance

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """For every pruned group, the sorted unit indices kept; groups not listed keep all units."""

    kept: Mapping[int, np.ndarray]

    def removed(self, deps: Dependencies) -> int:
        return sum(deps.group(gid).unit_count - len(kept) for gid, kept in self.kept.items())


#: ONNX Runtime's CPU kernels pack channels in blocks: an odd count such as 47 or 63 runs about
#: 40% slower than 48 or 64 (benchmarks/round_to.py). By default groups of AUTO_ROUND_MIN_UNITS or
#: more keep a multiple of AUTO_ROUND_TO; smaller groups are not rounded (it would stop pruning).
AUTO_ROUND_TO = 8
AUTO_ROUND_MIN_UNITS = 32


def effective_round_to(units: int, round_to: int | None) -> int:
    if round_to is not None:
        return round_to
    return AUTO_ROUND_TO if units >= AUTO_ROUND_MIN_UNITS else 1


def round_up(keep: int, units: int, round_to: int | None) -> int:
    step = effective_round_to(units, round_to)
    return min(units, max(1, math.ceil(keep / step) * step))


def kept_count(units: int, ratio: float, round_to: int | None, round_mode: str = "up") -> int:
    """Units left after removing `ratio` of them, as a multiple of `round_to` (None: the automatic
    choice above). "up" never removes more than asked; "down" keeps floor((1 - ratio) * units)
    rounded down (Torch-Pruning's convention), never fewer than one multiple."""
    if round_mode == "down":
        step = effective_round_to(units, round_to)
        keep = math.floor(units * (1 - ratio) + 1e-9)
        if keep >= units:
            return units
        return min(units, max(min(step, units), keep - keep % step, 1))
    return round_up(max(1, units - math.floor(units * ratio + 1e-9)), units, round_to)


def validate_budget(ratio: float | None, threshold: float | None, round_to: int | None) -> None:
    if (ratio is None) == (threshold is None):
        raise OptionError("give exactly one of ratio (fraction of units removed) or threshold (importance cut)")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise OptionError(f"ratio must be in [0, 1), got {ratio}: it is the fraction of units removed per group")
    if threshold is not None and (not math.isfinite(threshold) or threshold < 0):
        raise OptionError(f"threshold must be a finite number >= 0, got {threshold}")
    if round_to is not None and round_to < 1:
        raise OptionError(f"round_to must be >= 1, got {round_to}")


ALLOCATIONS = ("uniform", "global")


def make_plan(deps: Dependencies, importance: Importance, ratio: float | None = None,
              threshold: float | None = None, round_to: int | None = None, round_mode: str = "up",
              hidden: bool = False, allocation: str = "uniform", max_group_ratio: float = 0.9,
              kind_ratios: Mapping[str, float] | None = None, uniform_heads: bool = False,
              warn: bool = False) -> Plan:
    """Keep the highest-scored units of each prunable group; never remove every unit. Groups of an
    opt-in kind (the hidden size) are left whole unless `hidden`.

    `uniform` removes `ratio` of the units of every group. `global` removes `ratio` of all units of a
    kind (heads with heads, neurons with neurons), lowest first, ranking them across groups by their
    score divided by the mean score of their group, and takes at most `max_group_ratio` of any one
    group. `kind_ratios` overrides `ratio` per unit kind ("head", "neuron", "channel", ...).
    `uniform_heads`: under `global`, every head group of one size keeps the same number of heads
    (their mean, rounded), for runtimes whose config holds one head count for all layers.
    `warn`: log the groups a ratio leaves whole because they are too small for it.
    """
    validate_budget(ratio, threshold, round_to)
    if allocation not in ALLOCATIONS:
        raise OptionError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got '{allocation}'")
    if not 0 < max_group_ratio <= 1:
        raise OptionError(f"max_group_ratio must be in (0, 1], got {max_group_ratio}")
    for kind, value in (kind_ratios or {}).items():
        if not 0 <= value < 1:
            raise OptionError(f"the ratio for {kind} units must be in [0, 1), got {value}")
    groups = [g for g in deps.prunable if g.kind not in OPT_IN_KINDS or hidden]
    scores = {g.id: np.asarray(importance.scores[g.id], dtype=np.float64) for g in groups}

    def ratio_of(group: Group) -> float:
        assert ratio is not None  # asked only under a ratio budget (validate_budget: else a threshold)
        return (kind_ratios or {}).get(group.kind, ratio)

    counts: dict[int, int] = {}
    if ratio is not None and allocation == "global":
        counts = _global_counts(groups, scores, ratio_of, max_group_ratio, round_to, round_mode)
        if uniform_heads:
            _equalize(counts, [g for g in groups if g.kind == "head"])
    kept: dict[int, np.ndarray] = {}
    whole: list[tuple[Group, float]] = []  # groups a ratio > 0 leaves whole, with that ratio
    for group in groups:
        values = scores[group.id]
        units = group.unit_count
        # stable ordering: by score descending, lower index first among equals
        ranking = np.lexsort((np.arange(len(values)), -values))
        if group.id in counts:
            keep = counts[group.id]
        elif ratio is not None:
            keep = kept_count(units, ratio_of(group), round_to, round_mode)
            if keep == units and ratio_of(group) > 0:
                whole.append((group, ratio_of(group)))
        else:
            assert threshold is not None  # validate_budget: a threshold where there is no ratio
            # a threshold means "every unit scoring <= EPS": only an explicit round_to rounds it
            keep = round_up(int(np.count_nonzero(values > threshold)), units, round_to or 1)
        if keep < units:
            kept[group.id] = np.sort(ranking[:keep])
    if warn:
        warn_untouched(whole, round_to, round_mode)
    return Plan(kept)


def kind_ratios(head: float | None = None, neuron: float | None = None,
                channel: float | None = None) -> dict[str, float]:
    """The per-kind ratios given (the --head-ratio, --neuron-ratio and --channel-ratio options)."""
    given = {"head": head, "neuron": neuron, "channel": channel}
    return {kind: value for kind, value in given.items() if value is not None}


def warn_untouched(whole: Iterable[tuple[Group, float]], round_to: int | None, round_mode: str) -> None:
    """Say so when a ratio removes nothing from groups too small for it (3 KV heads at ratio 0.2);
    `whole`: those groups, each with the ratio it was given."""
    if round_mode != "up":
        return
    counts: dict[tuple, int] = {}
    for group, ratio in whole:
        key = (group.kind, group.unit_count, ratio, effective_round_to(group.unit_count, round_to))
        counts[key] = counts.get(key, 0) + 1
    for (kind, units, ratio, step), count in sorted(counts.items()):
        option = {"head": "--head-ratio", "neuron": "--neuron-ratio", "channel": "--channel-ratio"}.get(kind, "--ratio")
        logger.warning("%d %s groups of %d units keep all of them at ratio %g (a ratio never removes more than "
                       "asked, and kept counts are multiples of %d); a larger %s or --round-mode down removes "
                       "some", count, kind, units, ratio, step, option)


def _equalize(counts: dict[int, int], groups: list[Group]) -> None:
    """Give groups of the same size the same kept count: their mean, rounded (at least 1)."""
    by_size: dict[int, list[Group]] = {}
    for group in groups:
        by_size.setdefault(group.unit_count, []).append(group)
    for members in by_size.values():
        kept = [counts.get(g.id, g.unit_count) for g in members]
        common = max(1, round(sum(kept) / len(kept)))
        for group in members:
            counts[group.id] = common


def _global_counts(groups: list[Group], scores: Mapping[int, np.ndarray], ratio_of: Callable[[Group], float],
                   max_group_ratio: float, round_to: int | None, round_mode: str) -> dict[int, int]:
    """Units kept per group when each kind's units compete across groups (see `make_plan`)."""
    counts: dict[int, int] = {}
    by_kind: dict[str, list[Group]] = {}
    for group in groups:
        by_kind.setdefault(group.kind, []).append(group)
    for members in by_kind.values():
        pool = []  # (normalized score, group id)
        for group in members:
            values = scores[group.id]
            mean = float(np.mean(values)) if np.mean(values) > 0 else 1.0
            pool += [(v / mean, group.id) for v in values]
        budget = math.floor(sum(g.unit_count for g in members) * ratio_of(members[0]) + 1e-9)
        removable = {g.id: min(g.unit_count - 1, math.floor(g.unit_count * max_group_ratio + 1e-9))
                     for g in members}
        removed = dict.fromkeys(removable, 0)
        for _, group_id in sorted(pool, key=lambda item: item[0]):
            if budget == 0:
                break
            if removed[group_id] < removable[group_id]:
                removed[group_id] += 1
                budget -= 1
        for group in members:
            units = group.unit_count
            share = removed[group.id] / units
            counts[group.id] = kept_count(units, share, round_to, round_mode) if share else units
    return counts


def group_label(group: Group) -> str:
    """A readable name for the group: its first weight named after a module (`layer.0.fc.weight`)
    when there is one (exporters also give weights names like `val_95`), else its first member."""
    named = [m for m in group.weights if "." in m.tensor]
    first = (named or list(group.weights) or list(group.members))[0]
    return f"{first.tensor}[axis {first.axis}]"
