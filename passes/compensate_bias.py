"""compensate-bias: add what the removed units gave on average to the bias of the layer that read them (FLAP)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.calib import token_rows
from graphprune.errors import OptionError
from graphprune.ir.model import Model
from graphprune.passes.reconstruct import (
    consumers_of_removed,
    features,
    unpruned_and_calibration,
)
from graphprune.pipeline import AnalysisManager, PassResult, RewritePass, register
from graphprune.stream import collect

logger = logging.getLogger(__name__)


class _Means:
    """Mean of every element of the consumers' inputs over the calibration rows (padding left out)."""

    def __init__(self, names: set[str]) -> None:
        self.tensors = names
        self.sums: dict[str, np.ndarray] = {}
        self.rows: dict[str, int] = {}

    def add(self, batch: dict[str, np.ndarray], values: dict[str, np.ndarray]) -> None:
        for name in self.tensors & set(values):
            rows = token_rows(batch, np.asarray(values[name], np.float64))
            self.sums[name] = self.sums.get(name, 0) + rows.sum(axis=0)
            self.rows[name] = self.rows.get(name, 0) + len(rows)

    def mean(self, name: str) -> np.ndarray:
        return self.sums[name] / max(self.rows[name], 1)


@dataclass(frozen=True)
class CompensateOptions:
    batch: int = 16


@register
class CompensateBiasPass(RewritePass):
    """FLAP's bias compensation: a removed unit's input to the next layer is replaced by its mean.

    For each MatMul/Gemm whose contraction axis lost units (an attention output projection, an FFN
    down projection), the dense model's mean activation of the removed inputs over the calibration
    rows, times their dense weight rows, is added to the layer's output: to a Gemm's constant bias,
    to the constant of a bias Add that follows, or as a new bias Add. Training-free and cheap (one
    forward pass of the dense model, no logits); pairs with `importance{kind=flap}`, whose score is
    what such a compensation cannot give back (the activation's variance).

    Reads: the model before `prune-units` (kept by that pass when this one follows it), the
    calibration inputs (else seeded random inputs). Changes: biases of those layers (adds an Add
    node where a layer has none). Preserves: graph I/O and every shape. Options: batch.
    """

    name = "compensate-bias"
    aliases = ("compensate",)
    Options = CompensateOptions
    needs_unpruned = True

    def check(self, model: Model, am: AnalysisManager) -> None:
        if self.options.batch < 1:
            raise OptionError("compensate-bias needs batch >= 1")

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        dense, feeds = unpruned_and_calibration(am, self.name)
        kept = am.state.kept
        consumers = [c for c in consumers_of_removed(model, dense, kept) if c.conv is None]
        if not consumers:
            return PassResult(False, {"layers_compensated": 0})
        means = _Means({c.x for c in consumers})
        collect(dense, feeds, [means], self.options.batch)
        dense_consts, tensors = dense.constants(), model.tensors()
        for consumer in consumers:
            dense_weight = consumer.weight_rows(np.asarray(dense_consts[consumer.weight].values, np.float64))
            kept_rows = kept.get((consumer.weight, 1 if consumer.transposed else 0))
            if kept_rows is None:
                continue
            removed = np.setdiff1d(np.arange(len(dense_weight)), kept_rows)
            shift = means.mean(consumer.x)[removed] @ dense_weight[removed]
            _add_bias(model, tensors[consumer.y], features(shift[None, :], consumer.columns)[0])
        return PassResult(True, {"layers_compensated": len(consumers)})


def _add_bias(model: Model, output: gs.Variable, shift: np.ndarray) -> None:
    """Add `shift` to what `output`'s producer computes: into its bias where it has a constant one."""
    node = output.inputs[0]
    if node.op == "Gemm" and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) \
            and node.inputs[2].values.shape == shift.shape:
        bias = node.inputs[2]
        bias.values = (bias.values + shift / node.attrs.get("beta", 1.0)).astype(bias.values.dtype)
        return
    follower = output.outputs[0] if len(output.outputs) == 1 else None
    if follower is not None and follower.op == "Add":
        other = next((t for t in follower.inputs if t is not output), None)
        if isinstance(other, gs.Constant) and other.values.shape == shift.shape and len(other.outputs) == 1:
            other.values = (other.values + shift).astype(other.values.dtype)
            return
    # a new Add writes `output` (its readers and graph-output status stay); the layer writes a new tensor
    taken = set(model.tensors())
    name = f"{output.name}_uncompensated"
    while name in taken:
        name += "_"
    raw = gs.Variable(name, dtype=output.dtype, shape=output.shape)
    node.outputs[node.outputs.index(output)] = raw
    bias = gs.Constant(f"{output.name}_compensation", shift.astype(np.dtype(output.dtype or np.float32)))
    model.graph.nodes.append(gs.Node("Add", name=f"{output.name}_compensate", inputs=[raw, bias], outputs=[output]))
    model.graph.toposort()
