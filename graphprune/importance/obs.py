"""Structured Optimal Brain Surgeon scores: which units the consumer layer can best do without, given
that `reconstruct` re-fits it afterwards (ZipLM/OBS-style, training-free).

For a group whose units are read by one MatMul/Gemm consumer Y = X W (X: the group's activation,
K = units x elements columns; W: the consumer's [K, N] weight rows of the group), the least-squares
error of dropping a set S of X's columns and re-fitting the rest is tr(W_S^T (H^-1_SS)^-1 W_S), with
H = X^T X over calibration rows (ridge-damped). Units are removed greedily, each step the one whose
removal adds the least error, updating W and H^-1 as the optimal re-fit would (a few units per
step in large groups). A unit's score is the normalized cumulative error at the step it goes, so the
plan's "lowest scores go" follows the greedy order; the last unit standing scores highest.

Unlike magnitude or Wanda-style scores, this sees redundancy: two units carrying the same signal
score low together at first, and once one goes the other becomes essential. Groups without exactly
one MatMul/Gemm consumer pair are left to the caller (activation scores).
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar

import numpy as np
import scipy.linalg

from graphprune.analysis.deps import Dependencies, Group, Member
from graphprune.calib import token_rows
from graphprune.importance.activation import ActivationStatistics, consumer_pairs
from graphprune.importance.base import calibration_feeds, register_scorer
from graphprune.inputs import PassInputs
from graphprune.ir.model import Model
from graphprune.stream import collect

logger = logging.getLogger(__name__)

BATCH = 16
DAMP = 0.01  # ridge: DAMP x mean diagonal of H, as `reconstruct` uses
#: at most this many greedy steps per group (large groups remove several units per step)
MAX_STEPS = 128


def _consumer_rows(model: Model, weight: Member) -> np.ndarray | None:
    """The consumer weight as [K, N] rows of the group's segment (None: not a 2-D MatMul/Gemm weight)."""
    const = model.constants()[weight.tensor]
    node = next((n for n in const.outputs if n.op in ("MatMul", "Gemm")), None)
    values = np.asarray(const.values, np.float64)
    if node is None or values.ndim != 2 or (node.op == "Gemm" and node.attrs.get("transA", 0)):
        return None
    rows = np.moveaxis(values, weight.axis, 0)[weight.start:weight.stop]
    return rows if rows.shape[1] == values.shape[1 - weight.axis] else None


def greedy_removal(gram: np.ndarray, w: np.ndarray, units: int, damp: float = DAMP,
                   remove: int | None = None) -> np.ndarray:
    """Per unit (consecutive equal blocks of rows of `w`), the cumulative relative re-fit error at the
    greedy step that removes it; the last unit scores above all others. `remove`: stop once that
    many units are gone; each unit left then scores the error its removal would add at that point
    (above every removed unit's)."""
    size = len(gram) // units
    outputs = w.shape[1]
    energy = max(float(np.sum(w * (gram @ w))), 1e-30)
    hinv = _spd_inverse(gram + _ridge(gram, damp) * np.eye(len(gram)))
    w = w.copy()
    # hinv and w hold `size` rows for each unit in `slots`; a removed unit's rows are zero until the
    # matrices are compacted (each step then costs a rank-k update, not a copy of hinv)
    slots = np.arange(units)
    alive = np.ones(units, bool)
    scores = np.zeros(units)
    total = 0.0
    per_step = max(1, math.ceil((units - 1) / MAX_STEPS))
    update = np.empty_like(hinv)  # reused: a fresh n x n array per step costs more than the product
    left = units - 1 if remove is None else min(remove, units - 1)  # units still to remove
    while True:
        live = np.flatnonzero(alive)
        if size == 1:
            costs = np.sum(np.square(w[live]), axis=1) / np.maximum(np.diag(hinv)[live], 1e-30)
        else:
            costs = np.array([float(np.sum(w[s] * np.linalg.solve(hinv[s, s], w[s])))
                              for s in (slice(i * size, (i + 1) * size) for i in live)])
        if left == 0:
            break
        chosen = live[np.sort(np.argsort(costs, kind="stable")[:min(per_step, left)])]
        left -= len(chosen)
        index = (chosen[:, None] * size + np.arange(size)).reshape(-1)
        solve = np.linalg.solve(hinv[np.ix_(index, index)], np.concatenate([w[index], hinv[index]], axis=1))
        total += float(np.sum(w[index] * solve[:, :outputs]))
        # the optimal re-fit of the rest, and the inverse Hessian without the removed rows
        column = hinv[:, index]
        w -= column @ solve[:, :outputs]
        np.matmul(column, solve[:, outputs:], out=update[:len(hinv), :len(hinv)])
        hinv -= update[:len(hinv), :len(hinv)]
        alive[chosen] = False
        scores[slots[chosen]] = total / energy
        if 4 * alive.sum() <= 3 * len(alive):
            rows = (np.flatnonzero(alive)[:, None] * size + np.arange(size)).reshape(-1)
            hinv, w = hinv[np.ix_(rows, rows)], w[rows]
            slots, alive = slots[alive], np.ones(int(alive.sum()), bool)
    if remove is None:
        scores[slots[alive][0]] = 2.0 * max(scores.max(), 1.0)
    else:
        scores[slots[live]] = (total + np.maximum(costs, 0.0)) / energy
    return scores


def refit_rows(gram: np.ndarray, w: np.ndarray, kept_rows: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """The kept rows' weights W' that best reproduce X W from X's kept columns alone: the optimal
    re-fit the greedy removal assumes, solve(H_SS, (H W)_S) with the same ridge-damped H = X^T X."""
    damped = gram + _ridge(gram, damp) * np.eye(len(gram))
    system = damped[np.ix_(kept_rows, kept_rows)]
    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(system), damped[kept_rows] @ w)
    except np.linalg.LinAlgError:  # not positive definite after all (damp=0 on rank-deficient data)
        return np.linalg.lstsq(system, damped[kept_rows] @ w, rcond=None)[0]


def _ridge(gram: np.ndarray, damp: float) -> float:
    return damp * float(np.mean(np.diag(gram))) + 1e-12


def _spd_inverse(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a symmetric positive definite matrix by Cholesky (a general inverse where
    the factorization fails)."""
    factor, info = scipy.linalg.lapack.dpotrf(matrix, lower=False)
    if info == 0:
        inverse, info = scipy.linalg.lapack.dpotri(factor, lower=False)
        if info == 0:  # potri fills the upper triangle only
            return np.triu(inverse) + np.triu(inverse, 1).T
    return np.linalg.inv(matrix)


def obs_pair(model: Model, group: Group) -> tuple[Member, Member, np.ndarray] | None:
    """The group's activation, its one 2-D MatMul/Gemm consumer weight and that weight's rows of the
    group (as [K, N]), when the group has exactly one such consumer reading a last-axis segment."""
    pairs = consumer_pairs(model, group)
    if len(pairs) != 1:
        return None
    act, weight = pairs[0]
    tensor = model.tensors()[act.tensor]
    rows = _consumer_rows(model, weight)
    if rows is None or tensor.shape is None or act.axis not in (-1, len(tensor.shape) - 1) \
            or act.length % group.unit_count or act.repeats not in (None, 1):
        return None
    return act, weight, rows


class ObsStatistics:
    """The Gram matrix X^T X of every OBS-scorable group's activation segment, batch by batch."""

    def __init__(self, model: Model, deps: Dependencies) -> None:
        self.deps = deps
        self.chosen = {g.id: found for g in deps.prunable if (found := obs_pair(model, g)) is not None}
        self.tensors = {act.tensor for act, _, _ in self.chosen.values()}
        self.grams = {gid: np.zeros((act.length,) * 2) for gid, (act, _, _) in self.chosen.items()}

    def add(self, batch: dict[str, np.ndarray], values: dict[str, np.ndarray]) -> None:
        for gid, (act, _, _) in self.chosen.items():
            if act.tensor in values:
                x = token_rows(batch, np.asarray(values[act.tensor], np.float32))[:, act.start:act.stop]
                self.grams[gid] += x.T @ x  # float32 products of one batch, summed in float64

    def scores(self) -> dict[int, np.ndarray]:
        groups: dict[int, Group] = {g.id: g for g in self.deps.prunable}
        scores = {gid: greedy_removal(self.grams[gid], rows, groups[gid].unit_count)
                  for gid, (_, _, rows) in self.chosen.items()}
        logger.debug("OBS scores for %d of %d groups", len(scores), len(self.deps.prunable))
        return scores


def obs_scores(model: Model, deps: Dependencies, feeds: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
    """Scores for every prunable group with one 2-D MatMul/Gemm consumer; other groups are left out."""
    statistics = ObsStatistics(model, deps)
    collect(model, feeds, [statistics], BATCH)
    return statistics.scores()


class Obs:
    """OBS scores where a group has one MatMul/Gemm consumer pair, activation (Wanda-sp) scores for
    the other groups with a consumer, from one pass over the calibration data."""

    kinds: ClassVar[tuple[str, ...]] = ("obs",)

    def __call__(self, model: Model, deps: Dependencies, kind: str, inputs: PassInputs) -> dict[int, np.ndarray]:
        feeds = calibration_feeds(model, inputs, kind)
        obs = ObsStatistics(model, deps)
        activation = ActivationStatistics(model, deps, skip=set(obs.chosen))
        collect(model, feeds, [obs, activation], BATCH)
        return obs.scores() | activation.scores()


register_scorer(Obs())
