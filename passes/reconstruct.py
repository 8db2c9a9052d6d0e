"""reconstruct: after units are removed, re-fit each consumer's weights by least squares so that its
output on calibration data matches the dense model's again. No training: one ridge solve per layer.

A consumer is a MatMul or Gemm with a constant weight whose contraction axis lost units (an
attention output projection after heads went, an FFN down projection after neurons went), or a 2-D
Conv (group 1) whose input channels went, refit on its input patches (im2col; at most MAX_ROWS
sampled positions per batch). Its output axis must be unchanged, so the dense output is the
target. Layers are refit in graph order, each on the inputs the already refit pruned model gives
it, so later layers also absorb the error of earlier ones; where the output flows into a residual
Add, the target also makes up for the drift of the skip path (dense skip - pruned skip).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.calib import RANDOM_SAMPLES, positions, random_calibration, token_rows
from graphprune.errors import OptionError
from graphprune.ir.model import Model
from graphprune.ir.weights import replacement
from graphprune.ops import CALIBRATED_OPS
from graphprune.pipeline import AnalysisManager, PassResult, RewritePass, register, take_state
from graphprune.stream import Walk

logger = logging.getLogger(__name__)

#: set by `reconstruct`'s check: the prune pass then keeps a copy of the model before it prunes


#: conv consumers: at most this many output positions per calibration batch enter the fit
MAX_ROWS = 8192


@dataclass(frozen=True)
class ConvGeometry:
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]  # ONNX order: top, left, bottom, right

    @classmethod
    def of(cls, node: gs.Node, weight: np.ndarray) -> ConvGeometry | None:
        if weight.ndim != 4 or node.attrs.get("group", 1) != 1 or node.attrs.get("auto_pad", "NOTSET") not in (
                "NOTSET", "VALID", b"NOTSET", b"VALID"):
            return None
        return cls(tuple(weight.shape[2:]), tuple(node.attrs.get("strides", (1, 1))),
                   tuple(node.attrs.get("dilations", (1, 1))), tuple(node.attrs.get("pads", (0, 0, 0, 0))))

    def patches(self, x: np.ndarray) -> np.ndarray:
        """[N, C, H, W] -> [N * output positions, C * kh * kw] (im2col, the weight's own order)."""
        import torch
        import torch.nn.functional as F  # noqa: N812

        top, left, bottom, right = self.pads
        t = F.pad(torch.from_numpy(np.ascontiguousarray(x)), (left, right, top, bottom))
        cols = F.unfold(t, self.kernel, dilation=self.dilations, stride=self.strides)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]).numpy()


@dataclass(frozen=True, eq=False)
class Consumer:
    x: str  # input activation
    y: str  # output
    weight: str
    transposed: bool  # Gemm transB: the weight is [N, K]
    residual: str | None = None  # the skip input of the residual Add the output flows into
    conv: ConvGeometry | None = None
    columns: np.ndarray | None = None  # the dense output's features still there (None: all)
    residual_columns: np.ndarray | None = None

    def weight_rows(self, values: np.ndarray) -> np.ndarray:
        """The weight as [contraction, outputs]."""
        if self.conv is not None:
            return values.reshape(values.shape[0], -1).T
        return values.T if self.transposed else values

    def weight_values(self, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.conv is not None:
            return rows.T.reshape(shape)
        return rows.T if self.transposed else rows

    def input_rows(self, batch: dict[str, np.ndarray], value: np.ndarray, index: int) -> np.ndarray:
        if self.conv is not None:
            return _sampled(self.conv.patches(value), index)
        return token_rows(batch, value)


def output_rows(batch: dict[str, np.ndarray], value: np.ndarray, index: int) -> np.ndarray:
    """An output (or skip) as [rows, features]: token rows, or for feature maps channel-last
    positions, sampled as `Consumer.input_rows` samples the matching patches."""
    if value.ndim == 4 and positions(batch, value) is None:
        return _sampled(np.moveaxis(value, 1, -1).reshape(-1, value.shape[1]), index)
    return token_rows(batch, value)


def features(rows: np.ndarray, columns: np.ndarray | None) -> np.ndarray:
    return rows if columns is None else rows[:, columns]


def _sampled(rows: np.ndarray, index: int) -> np.ndarray:
    if len(rows) <= MAX_ROWS:
        return rows
    picked = np.random.default_rng([index, len(rows)]).choice(len(rows), MAX_ROWS, replace=False)
    return rows[np.sort(picked)]


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


def unpruned_and_calibration(am: AnalysisManager, pass_name: str) -> tuple[Model, Mapping[str, np.ndarray]]:
    """The model as `prune-units` found it and the calibration inputs (else seeded random inputs),
    for a pass that corrects the pruned model against the dense one."""
    dense = am.state.unpruned
    if dense is None:
        raise OptionError(f"{pass_name} must follow prune-units in the pipeline")
    feeds = am.inputs.calibration
    if feeds is None:
        logger.info("no calibration data: %s uses %d seeded random samples", pass_name, RANDOM_SAMPLES)
        feeds = random_calibration(dense.to_onnx())
    return dense, feeds


def consumers_of_removed(pruned: Model, dense: Model, kept: dict) -> list[Consumer]:
    """MatMul/Gemm/Conv nodes whose contraction axis lost units. Their output may have lost units too
    (a layer between two pruned ones): the target is then the dense output's kept features."""
    # weights keep their names when sliced (and are unshared before pruning): they pair the nodes
    dense_nodes = {n.inputs[1].name: n for n in dense.graph.nodes
                   if n.op in CALIBRATED_OPS and isinstance(n.inputs[1], gs.Constant)}
    found = []
    for node in pruned.graph.nodes:
        if node.op not in CALIBRATED_OPS or node.inputs[1].name not in dense_nodes:
            continue
        w, old = node.inputs[1], dense_nodes[node.inputs[1].name].inputs[1]
        if not isinstance(w, gs.Constant) or not isinstance(old, gs.Constant):
            continue
        conv = ConvGeometry.of(node, w.values) if node.op == "Conv" else None
        transposed = node.op == "Gemm" and bool(node.attrs.get("transB", 0))
        if (node.op == "Conv" and conv is None) or (node.op != "Conv" and w.values.ndim != 2) or \
                (node.op == "Gemm" and node.attrs.get("transA", 0)):
            continue
        k, n = (1, 0) if transposed or conv else (0, 1)
        if w.values.shape[k] >= old.values.shape[k]:
            continue
        y = node.outputs[0]
        columns = _kept_features(kept, y, 1 if conv else -1) if w.values.shape[n] < old.values.shape[n] else None
        if w.values.shape[n] < old.values.shape[n] and columns is None:
            continue
        residual = _residual_input(pruned, y.name)
        residual_columns = None
        if residual is not None:
            residual_columns = _kept_features(kept, pruned.tensors()[residual], 1 if conv else -1)
        found.append(Consumer(node.inputs[0].name, y.name, w.name, transposed, residual, conv, columns,
                              residual_columns))
    return found


def _kept_features(kept: dict, tensor: gs.Tensor, axis: int) -> np.ndarray | None:
    if tensor.shape is None:
        return None
    return kept.get((tensor.name, axis % len(tensor.shape)))


def _bias(node: gs.Node) -> np.ndarray | None:
    """The bias a Gemm or Conv adds to its product (None: none, or not constant)."""
    if node.op in ("Gemm", "Conv") and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        return np.asarray(node.inputs[2].values, np.float64) * node.attrs.get("beta", 1.0)
    return None


@dataclass(frozen=True)
class ReconstructOptions:
    damp: float = 0.01  # ridge: damp x mean diagonal of X^T X
    batch: int = 16
    residual: bool = True  # also absorb the drift of the residual stream the output is added to


@register
class ReconstructPass(RewritePass):
    """Least-squares refit of the consumers of removed units (see module doc).

    Reads: the model before `prune-units` (kept by that pass when this one follows it), the
    calibration inputs (`am.inputs.calibration`, else seeded random inputs). Changes: the
    weights of MatMul/Gemm consumers whose contraction axis shrank. Preserves: graph I/O and every
    shape. Options: damp (ridge term relative to the mean diagonal of X^T X), batch.
    """

    name = "reconstruct"
    Options = ReconstructOptions
    needs_unpruned = True

    def check(self, model: Model, am: AnalysisManager) -> None:
        if self.options.damp < 0 or self.options.batch < 1:
            raise OptionError("reconstruct needs damp >= 0 and batch >= 1")

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        dense, feeds = unpruned_and_calibration(am, self.name)
        consumers = consumers_of_removed(model, dense, am.state.kept)
        if not consumers:
            return PassResult(False, {"layers_refit": 0})
        skips = {c.y: c.residual for c in consumers if c.residual and self.options.residual}
        state = am.state.resized  # a KV cache that lost heads: the pruned model's feeds lose them too
        # both models stream through the calibration data side by side, one consumer at a time: the
        # pruned one runs each stretch after the consumers in it were refit
        dense_walk = Walk(dense, [c.y for c in consumers] + list(skips.values()), feeds, self.options.batch)
        pruned_walk = Walk(model, [c.x for c in consumers] + list(skips.values()),
                           take_state(dict(feeds), state), self.options.batch)
        dense_nodes = _nodes_by_weight(dense)
        pruned_nodes = _nodes_by_weight(model)
        errors = []
        for index, consumer in enumerate(consumers):
            node, dense_node = pruned_nodes[consumer.weight], dense_nodes[consumer.weight]
            _drain(pruned_walk.advance(until=node))
            _drain(dense_walk.advance(until=dense_node))
            skip = skips.get(consumer.y)
            dense_skips = [dense_walk.live(b)[skip] for b in range(len(dense_walk))] if skip else None
            dense_ys = [values[consumer.y] for _, values in dense_walk.advance(through=dense_node)]
            errors.append(self._refit(node, consumer, pruned_walk, dense_ys, dense_skips, skip))
            logger.info("reconstruct %d/%d: %s, relative error %.4g -> %.4g", index + 1, len(consumers),
                        consumer.weight, *errors[-1])
        peak = max(dense_walk.store.peak, pruned_walk.store.peak)
        dense_walk.close()
        pruned_walk.close()
        return PassResult(True, {"layers_refit": len(consumers),
                                 "relative_error_before": [round(b, 6) for b, _ in errors],
                                 "relative_error_after": [round(a, 6) for _, a in errors],
                                 "stream_peak_mib": round(peak / 2**20, 1)})

    def _refit(self, node: gs.Node, consumer: Consumer, walk: Walk, dense_ys: list[np.ndarray],
               dense_skips: list[np.ndarray] | None, skip: str | None) -> tuple[float, float]:
        """Refits one consumer on the pruned model's inputs to it (the walk stands right before it)."""
        weight = node.inputs[1]
        w = consumer.weight_rows(np.asarray(weight.values, np.float64))
        bias = _bias(node)
        gram = np.zeros((w.shape[0], w.shape[0]))
        cross = np.zeros_like(w)
        target_energy = 0.0
        rows = 0
        for index, batch in enumerate(walk.batches):
            live = walk.live(index)
            x = consumer.input_rows(batch, np.asarray(live[consumer.x], np.float32), index)
            y = features(output_rows(batch, np.asarray(dense_ys[index], np.float64), index), consumer.columns)
            if skip:  # the dense sum is y + skip: the pruned output also makes up for the skip's drift
                assert dense_skips is not None  # `run` reads them wherever there is a skip
                dense_skip = features(output_rows(batch, np.asarray(dense_skips[index], np.float64), index),
                                       consumer.residual_columns)
                y = y + dense_skip - output_rows(batch, np.asarray(live[skip], np.float64), index)
            if bias is not None:
                y = y - bias
            gram += x.T @ x  # float32 products of one batch, summed in float64
            cross += x.T @ y.astype(np.float32)
            rows += len(x)
            target_energy += float(np.sum(np.square(y)))
        scale = max(target_energy, 1e-30)
        # ||X W - Y||^2 from the sums, without another pass over the data
        residual = max(float(np.sum(w * (gram @ w)) - 2 * np.sum(w * cross)) + target_energy, 0.0)
        if rows < len(gram):  # fewer samples than inputs: a refit would memorize the calibration
            logger.warning("reconstruct: %s kept as is: %d calibration rows for %d inputs (give more --calib samples)",
                           consumer.weight, rows, len(gram))
            return residual / scale, residual / scale
        ridge = self.options.damp * float(np.mean(np.diag(gram))) + 1e-12
        refit = np.linalg.solve(gram + ridge * np.eye(len(gram)), cross)
        after = float(np.sum(refit * (gram @ refit)) - 2 * np.sum(refit * cross)) + target_energy
        if not after < residual:  # the ridge term can cost more than it gains: keep what was there
            return residual / scale, residual / scale
        weight.values = replacement(weight.values, np.ascontiguousarray(
            consumer.weight_values(refit, weight.values.shape).astype(weight.values.dtype)))
        return residual / scale, max(after, 0.0) / scale


def _nodes_by_weight(model: Model) -> dict[str, gs.Node]:
    return {n.inputs[1].name: n for n in model.graph.nodes
            if n.op in CALIBRATED_OPS and len(n.inputs) > 1 and isinstance(n.inputs[1], gs.Constant)}


def _drain(steps) -> None:
    for _ in steps:
        pass
