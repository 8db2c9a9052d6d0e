"""reconstruct: after units are removed, re-fit each consumer's weights by least squares so that its
output on calibration data matches the dense model's again. No training: one ridge solve per layer.

A consumer is a MatMul or Gemm with a constant weight whose contraction axis lost units (an
attention output projection after heads went, an FFN down projection after neurons went). Its
output axis must be unchanged, so the dense output is the target. Layers are refit in graph order,
each on the inputs the already refit pruned model gives it, so later layers also absorb the error
of earlier ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphprune import runtime
from graphprune.calib import RANDOM_SAMPLES, batches, dynamic_sequence, random_calibration, token_rows
from graphprune.errors import OptionError
from graphprune.ir import Model
from graphprune.pipeline import AnalysisManager, PassResult, RewritePass, register

logger = logging.getLogger(__name__)

#: set by `reconstruct`'s check: the prune pass then keeps a copy of the model before it prunes
KEEP_UNPRUNED = "keep_unpruned"
UNPRUNED = "unpruned"


@dataclass(frozen=True)
class Consumer:
    x: str  # input activation
    y: str  # output
    weight: str
    transposed: bool  # Gemm transB: the weight is [N, K]
    residual: str | None = None  # the skip input of the residual Add the output flows into


def _residual_input(model: Model, output: str) -> str | None:
    """The other input of the residual Add that `output` reaches through bias Adds, if any."""
    tensor = model.tensors()[output]
    while len(tensor.outputs) == 1 and tensor.outputs[0].op == "Add":
        node = tensor.outputs[0]
        other = next((t for t in node.inputs if t is not tensor), tensor)
        if other is tensor:
            return None
        if not isinstance(other, gs.Constant):
            return other.name if (other.shape is not None and tensor.shape is not None
                                  and len(other.shape) == len(tensor.shape)) else None
        tensor = node.outputs[0]
    return None


def _consumers(pruned: Model, dense: Model) -> list[Consumer]:
    # weights keep their names when sliced (and are unshared before pruning): they pair the nodes
    dense_nodes = {n.inputs[1].name: n for n in dense.graph.nodes
                   if n.op in ("MatMul", "Gemm") and isinstance(n.inputs[1], gs.Constant)}
    found = []
    for node in pruned.graph.nodes:
        if node.op not in ("MatMul", "Gemm") or node.inputs[1].name not in dense_nodes:
            continue
        w, old = node.inputs[1], dense_nodes[node.inputs[1].name].inputs[1]
        if not isinstance(w, gs.Constant) or not isinstance(old, gs.Constant) or w.values.ndim != 2:
            continue
        transposed = node.op == "Gemm" and bool(node.attrs.get("transB", 0))
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            continue
        k, n = (1, 0) if transposed else (0, 1)
        if w.values.shape[k] < old.values.shape[k] and w.values.shape[n] == old.values.shape[n]:
            residual = _residual_input(pruned, node.outputs[0].name)
            found.append(Consumer(node.inputs[0].name, node.outputs[0].name, w.name, transposed, residual))
    return found


def _gemm_bias(node: gs.Node) -> np.ndarray | None:
    if node.op == "Gemm" and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        return np.asarray(node.inputs[2].values, np.float64) * node.attrs.get("beta", 1.0)
    return None


class _DenseTargets:
    """The dense model's outputs of every consumer (and residual skips) per calibration batch, as
    token rows: computed in one dense run per batch and kept (as float32) when they fit in
    CACHE_BYTES, else recomputed for each consumer."""

    def __init__(self, dense: Model, consumers: list[Consumer], skips: dict[str, str],
                 feeds: dict[str, np.ndarray], batch: int) -> None:
        self.names = list(dict.fromkeys([c.y for c in consumers] + list(skips.values())))
        proto = runtime.with_outputs(dense.to_onnx(), dict.fromkeys(self.names, np.float32))
        self.session = runtime.session(proto, threads=2)
        self.feeds, self.batch, self.trim = feeds, batch, dynamic_sequence(proto)
        self.cache: list[dict[str, np.ndarray]] | None = []
        size = 0
        for chunk in self.batches():
            values = {n: token_rows(chunk, v).astype(np.float32) for n, v in
                      zip(self.names, self.session.run(self.names, chunk), strict=True)}
            size += sum(v.nbytes for v in values.values())
            if size > CACHE_BYTES:
                self.cache = None
                break
            self.cache.append(values)

    def batches(self):
        return batches(self.feeds, self.batch, trim=self.trim)

    def get(self, index: int, name: str, batch: dict[str, np.ndarray]) -> np.ndarray:
        if self.cache is not None:
            return self.cache[index][name].astype(np.float64)
        return token_rows(batch, np.asarray(self.session.run([name], batch)[0], np.float64))


#: the dense targets are kept in memory up to this size (else recomputed per consumer)
CACHE_BYTES = 2 << 30


@dataclass(frozen=True)
class ReconstructOptions:
    damp: float = 0.01  # ridge: damp x mean diagonal of X^T X
    batch: int = 16
    residual: bool = True  # also absorb the drift of the residual stream the output is added to


@register
class ReconstructPass(RewritePass):
    """Least-squares refit of the consumers of removed units (see module doc).

    Reads: the model before `prune-units` (kept by that pass when this one follows it), the
    calibration inputs (`am.context["calibration"]`, else seeded random inputs). Changes: the
    weights of MatMul/Gemm consumers whose contraction axis shrank. Preserves: graph I/O and every
    shape. Options: damp (ridge term relative to the mean diagonal of X^T X), batch.
    """

    name = "reconstruct"
    Options = ReconstructOptions

    def check(self, model: Model, am: AnalysisManager) -> None:
        if self.options.damp < 0 or self.options.batch < 1:
            raise OptionError("reconstruct needs damp >= 0 and batch >= 1")
        am.context[KEEP_UNPRUNED] = True

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        dense = am.context.get(UNPRUNED)
        if dense is None:
            raise OptionError("reconstruct must follow prune-units in the pipeline")
        feeds = am.context.get("calibration")
        if feeds is None:
            logger.info("no calibration data: reconstruction uses %d seeded random samples", RANDOM_SAMPLES)
            feeds = random_calibration(dense.to_onnx())
        consumers = _consumers(model, dense)
        if not consumers:
            return PassResult(False, {"layers_refit": 0})
        skips = {c.y: c.residual for c in consumers if c.residual and self.options.residual}
        targets = _DenseTargets(dense, consumers, skips, feeds, self.options.batch)
        # one session for every refit: the consumers' weights are inputs, fed as they are refit
        weights = {c.weight: np.asarray(model.constants()[c.weight].values) for c in consumers}
        outputs = dict.fromkeys([c.x for c in consumers] + list(skips.values()), np.float32)
        proto = runtime.with_outputs(runtime.with_weight_inputs(model.to_onnx(), set(weights)), outputs)
        session = runtime.session(proto, threads=2)
        errors = [self._refit(model, consumer, session, weights, targets, skips.get(consumer.y))
                  for consumer in consumers]
        return PassResult(True, {"layers_refit": len(consumers),
                                 "relative_error_before": [round(b, 6) for b, _ in errors],
                                 "relative_error_after": [round(a, 6) for _, a in errors]})

    def _refit(self, model: Model, consumer: Consumer, session, weights: dict[str, np.ndarray],
               targets: _DenseTargets, skip: str | None) -> tuple[float, float]:
        node = next(n for n in model.graph.nodes if n.op in ("MatMul", "Gemm") and n.inputs[1].name == consumer.weight)
        weight = node.inputs[1]
        w = np.asarray(weight.values, np.float64)
        w = w.T if consumer.transposed else w
        bias = _gemm_bias(node)
        wanted = [consumer.x] + ([skip] if skip else [])
        gram = np.zeros((w.shape[0], w.shape[0]))
        cross = np.zeros_like(w)
        target_energy = residual = 0.0
        for index, batch in enumerate(targets.batches()):
            got = [np.asarray(v, np.float64) for v in session.run(wanted, batch | weights)]
            x = token_rows(batch, got[0])
            y = targets.get(index, consumer.y, batch)
            if skip:  # the dense sum is y + skip: the pruned output also makes up for the skip's drift
                y = y + targets.get(index, skip, batch) - token_rows(batch, got[1])
            if bias is not None:
                y = y - bias
            gram += x.T @ x
            cross += x.T @ y
            residual += float(np.sum(np.square(x @ w - y)))
            target_energy += float(np.sum(np.square(y)))
        ridge = self.options.damp * float(np.mean(np.diag(gram))) + 1e-12
        refit = np.linalg.solve(gram + ridge * np.eye(len(gram)), cross)
        # the same data gives the error after the refit without another pass over it
        after = float(np.sum(refit * (gram @ refit)) - 2 * np.sum(refit * cross)) + target_energy
        weight.values = np.ascontiguousarray((refit.T if consumer.transposed else refit).astype(weight.values.dtype))
        weights[consumer.weight] = weight.values
        scale = max(target_energy, 1e-30)
        return residual / scale, max(after, 0.0) / scale
