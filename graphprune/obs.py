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

import numpy as np

from graphprune import runtime
from graphprune.activation import consumer_pairs
from graphprune.calib import batches, dynamic_sequence, token_rows
from graphprune.deps import Dependencies, Group, Member
from graphprune.ir import Model

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


def greedy_removal(gram: np.ndarray, w: np.ndarray, units: int, damp: float = DAMP) -> np.ndarray:
    """Per unit (consecutive equal blocks of rows of `w`), the cumulative relative re-fit error at the
    greedy step that removes it; the last unit scores above all others."""
    size = len(gram) // units
    energy = max(float(np.sum(w * (gram @ w))), 1e-30)
    hinv = np.linalg.inv(gram + (damp * float(np.mean(np.diag(gram))) + 1e-12) * np.eye(len(gram)))
    w = w.copy()
    alive = np.arange(units)  # hinv and w hold the rows of the alive units only, `size` rows each
    scores = np.zeros(units)
    total = 0.0
    per_step = max(1, math.ceil((units - 1) / MAX_STEPS))
    while len(alive) > 1:
        if size == 1:
            costs = np.sum(np.square(w), axis=1) / np.maximum(np.diag(hinv), 1e-30)
        else:
            costs = [float(np.sum(w[s] * np.linalg.solve(hinv[s, s], w[s])))
                     for s in (slice(i * size, (i + 1) * size) for i in range(len(alive)))]
        chosen = np.sort(np.argsort(costs, kind="stable")[:min(per_step, len(alive) - 1)])
        index = (chosen[:, None] * size + np.arange(size)).reshape(-1)
        solve = np.linalg.solve(hinv[np.ix_(index, index)], np.concatenate([w[index], hinv[index]], axis=1))
        total += float(np.sum(w[index] * solve[:, :w.shape[1]]))
        keep = np.ones(len(w), bool)
        keep[index] = False
        # the optimal re-fit of the rest, and the inverse Hessian without the removed rows
        outputs = w.shape[1]
        w = w[keep] - hinv[np.ix_(keep, index)] @ solve[:, :outputs]
        hinv = hinv[np.ix_(keep, keep)] - hinv[np.ix_(keep, index)] @ solve[:, outputs:][:, keep]
        scores[alive[chosen]] = total / energy
        alive = np.delete(alive, chosen)
    scores[alive[0]] = 2.0 * max(scores.max(), 1.0)
    return scores


def obs_scores(model: Model, deps: Dependencies, feeds: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
    """Scores for every prunable group with one 2-D MatMul/Gemm consumer; other groups are left out."""
    chosen: dict[int, tuple[Member, Member, np.ndarray]] = {}
    for group in deps.prunable:
        pairs = consumer_pairs(model, group)
        if len(pairs) != 1:
            continue
        act, weight = pairs[0]
        tensor = model.tensors()[act.tensor]
        rows = _consumer_rows(model, weight)
        if rows is None or tensor.shape is None or act.axis not in (-1, len(tensor.shape) - 1) \
                or (act.stop - act.start) % group.units:
            continue
        chosen[group.id] = (act, weight, rows)
    if not chosen:
        return {}
    tensors = model.tensors()
    names = sorted({act.tensor for act, _, _ in chosen.values()})
    proto = runtime.with_outputs(model.to_onnx(), {name: tensors[name].dtype for name in names})
    session = runtime.session(proto, threads=2)
    grams = {gid: np.zeros((act.stop - act.start,) * 2) for gid, (act, _, _) in chosen.items()}
    for batch in batches(feeds, BATCH, trim=dynamic_sequence(proto)):
        values = dict(zip(names, session.run(names, batch), strict=True))
        for gid, (act, _, _) in chosen.items():
            x = token_rows(batch, np.asarray(values[act.tensor], np.float64))[:, act.start:act.stop]
            grams[gid] += x.T @ x
    groups: dict[int, Group] = {g.id: g for g in deps.prunable}
    scores = {gid: greedy_removal(grams[gid], rows, groups[gid].units) for gid, (_, _, rows) in chosen.items()}
    logger.debug("OBS scores for %d of %d groups", len(scores), len(deps.prunable))
    return scores
