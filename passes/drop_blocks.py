"""drop-blocks: remove whole residual sub-blocks (attention or MLP): the branch becomes identity.

A residual block is an `Add(skip, branch)` whose branch is computed from the skip through weights
only it uses (an attention or MLP sub-block, pre- or post-norm). Its contribution is measured on
calibration data (or sample inputs) as Block Influence, 1 - cos(skip, skip + branch) averaged over
tokens (ShortGPT), or as RMS(branch) / RMS(skip); the blocks that contribute least are removed by
wiring the skip straight through. Cleanup then deletes the branch's now-dead nodes and weights.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphprune import runtime
from graphprune.calib import positions, token_rows
from graphprune.errors import OptionError
from graphprune.ir.model import Model
from graphprune.ops import WEIGHTED_OPS
from graphprune.pipeline import AnalysisManager, PassResult, RewritePass, register
from graphprune.stream import collect

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class ResidualBlock:
    add: gs.Node
    skip_index: int  # which input of the Add is the skip (read it from the Add: drops rewire it)
    branch: gs.Tensor
    nodes: tuple[gs.Node, ...]  # nodes only this branch uses, between the skip and the Add

    @property
    def skip(self) -> gs.Tensor:
        return self.add.inputs[self.skip_index]

    @property
    def name(self) -> str:
        return self.add.name or self.branch.name


def _exclusive_nodes(branch: gs.Tensor, skip: gs.Tensor, add: gs.Node, outputs: set[str]) -> list[gs.Node]:
    """Nodes whose every output is consumed only inside the branch, walking back from it and
    stopping at the skip (what computes the skip belongs to earlier blocks)."""
    inside: set[int] = {id(add)}
    nodes: list[gs.Node] = []
    stack = [branch]
    while stack:
        tensor = stack.pop()
        if tensor is skip or not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1:
            continue
        node = tensor.inputs[0]
        if id(node) in inside:
            continue
        if all(id(c) in inside for out in node.outputs for c in out.outputs) and not any(
                out.name in outputs for out in node.outputs):
            inside.add(id(node))
            nodes.append(node)
            stack.extend(node.inputs)
    return nodes


def _depends_on(tensor: gs.Tensor, source: gs.Tensor, limit: int = 10_000) -> bool:
    """Whether `tensor` is computed from `source` (data flow; sizes read by Shape do not count)."""
    seen: set[str] = set()
    stack = [tensor]
    while stack and len(seen) < limit:
        current = stack.pop()
        if current is source:
            return True
        if current.name in seen or not isinstance(current, gs.Variable) or len(current.inputs) != 1:
            continue
        seen.add(current.name)
        node = current.inputs[0]
        if node.op != "Shape":
            stack.extend(node.inputs)
    return False


def find_blocks(model: Model) -> list[ResidualBlock]:
    """Every residual Add whose branch holds weights used by nothing else."""
    outputs = {t.name for t in model.graph.outputs}
    blocks = []
    for node in model.graph.nodes:
        if node.op != "Add" or len(node.inputs) != 2:
            continue
        for skip_index in (0, 1):
            skip, branch = node.inputs[skip_index], node.inputs[1 - skip_index]
            if skip.shape is None or skip.shape != branch.shape or not _depends_on(branch, skip):
                continue
            nodes = _exclusive_nodes(branch, skip, node, outputs)
            if any(n.op in WEIGHTED_OPS and any(isinstance(t, gs.Constant) for t in n.inputs[1:]) for n in nodes):
                blocks.append(ResidualBlock(node, skip_index, branch, tuple(nodes)))
                break
    return blocks


#: how a block's contribution is measured (see DropBlocksPass)
METRICS = ("influence", "rms")


class _BlockStatistics:
    """Per block, over the rows (tokens, or positions of a feature map) of the calibration data:
    the energies of branch and skip, and the sum of cos(skip, skip + branch)."""

    def __init__(self, blocks: list[ResidualBlock]) -> None:
        self.blocks = blocks
        self.tensors = {t.name for b in blocks for t in (b.branch, b.skip)}
        self.branch_energy = np.zeros(len(blocks))
        self.skip_energy = np.zeros(len(blocks))
        self.cosines = np.zeros(len(blocks))
        self.rows = np.zeros(len(blocks))

    def add(self, batch: dict[str, np.ndarray], values: dict[str, np.ndarray]) -> None:
        for i, block in enumerate(self.blocks):
            if block.branch.name not in values or block.skip.name not in values:
                continue
            skip = _rows(batch, values[block.skip.name])
            branch = _rows(batch, values[block.branch.name])
            out = skip + branch
            self.branch_energy[i] += float(np.sum(np.square(branch)))
            self.skip_energy[i] += float(np.sum(np.square(skip)))
            norms = np.linalg.norm(skip, axis=1) * np.linalg.norm(out, axis=1)
            self.cosines[i] += float(np.sum(np.sum(skip * out, axis=1) / np.maximum(norms, 1e-30)))
            self.rows[i] += len(skip)

    def scores(self, metric: str) -> np.ndarray:
        if metric == "rms":
            return np.sqrt(self.branch_energy / np.maximum(self.skip_energy, 1e-24))
        return 1.0 - self.cosines / np.maximum(self.rows, 1)


def _rows(batch: dict[str, np.ndarray], value: np.ndarray) -> np.ndarray:
    """[rows, features] in float64: token rows (padding left out), or a feature map's positions."""
    value = np.asarray(value, np.float64)
    if value.ndim == 4 and positions(batch, value) is None:
        return np.moveaxis(value, 1, -1).reshape(-1, value.shape[1])
    return token_rows(batch, value)


def contributions(model: Model, blocks: list[ResidualBlock], seed: int = 0, metric: str = "influence",
                  feeds: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """Each block's contribution on `feeds` (default: seeded sample inputs): Block Influence
    (`influence`, ShortGPT: 1 - mean cosine of the residual stream before and after the block) or
    RMS(branch) / RMS(skip) (`rms`)."""
    if metric not in METRICS:
        raise OptionError(f"drop-blocks metric must be one of {', '.join(METRICS)}, got '{metric}'")
    if feeds is None:
        feeds = runtime.sample_inputs(model.to_onnx(), seed=seed)
    statistics = _BlockStatistics(blocks)
    collect(model, feeds, [statistics], BATCH)
    return statistics.scores(metric)


#: calibration samples per ORT run
BATCH = 16


def drop(model: Model, block: ResidualBlock) -> None:
    """Wire the skip past the Add: the branch becomes identity (cleanup removes its nodes). The skip
    is read from the Add now: dropping an earlier block may have rewired it."""
    add, skip = block.add, block.skip
    out = add.outputs[0]
    if out.name in {t.name for t in model.graph.outputs}:
        add.op = "Identity"
        add.inputs.clear()
        add.inputs.append(skip)
        return
    for consumer in list(out.outputs):
        for i, tensor in enumerate(consumer.inputs):
            if tensor is out:
                consumer.inputs[i] = skip
    add.outputs.clear()


@dataclass(frozen=True)
class DropOptions:
    count: int = 1
    seed: int = 0
    metric: str = "influence"


@register
class DropBlocksPass(RewritePass):
    """Remove the `count` residual sub-blocks that contribute least.

    Reads: the graph, and ORT runs on the calibration data (`am.inputs.calibration`, else seeded
    sample inputs), streamed without logits. Changes: the chosen Adds pass their skip input
    through; the branch's nodes become dead (run cleanup afterwards). Preserves: graph
    inputs/outputs and their shapes. Options: count (number of blocks to remove, fewer than the
    blocks found); metric (`influence`: Block Influence as ShortGPT ranks layers, 1 - the mean
    cosine between the residual stream before and after the block, over every token; `rms`:
    RMS(branch) / RMS(skip)); seed (of the sample inputs).
    """

    name = "drop-blocks"
    aliases = ("drop",)
    Options = DropOptions

    def check(self, model: Model, am: AnalysisManager) -> None:
        if self.options.count < 0:
            raise OptionError(f"drop-blocks count must be >= 0, got {self.options.count}")
        if self.options.metric not in METRICS:
            raise OptionError(f"drop-blocks metric must be one of {', '.join(METRICS)}, got '{self.options.metric}'")

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        if self.options.count == 0:
            return PassResult(False, {"blocks_found": 0, "blocks_dropped": []})
        model.infer_shapes()  # a residual Add joins two tensors of one shape
        blocks = find_blocks(model)
        if not blocks:
            raise OptionError("cannot drop blocks: the model has no residual block (an Add of a tensor and a "
                              "branch computed from it through weights only that branch uses)")
        if self.options.count >= len(blocks):
            raise OptionError(f"cannot drop {self.options.count} blocks: the model has {len(blocks)} residual "
                              "blocks and at least one must stay")
        scores = contributions(model, blocks, self.options.seed, self.options.metric, am.inputs.calibration)
        order = np.argsort(scores, kind="stable")[: self.options.count]
        dropped = []
        for index in sorted(order):
            block = blocks[index]
            drop(model, block)
            dropped.append({"block": block.name, "contribution": round(float(scores[index]), 6)})
        model.graph.cleanup(remove_unused_graph_inputs=False)
        model.graph.toposort()
        model.infer_shapes()
        logger.info("dropped %d of %d residual blocks", len(dropped), len(blocks))
        return PassResult(True, {"blocks_found": len(blocks), "blocks_dropped": dropped})
