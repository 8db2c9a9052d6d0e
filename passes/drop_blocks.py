"""drop-blocks: remove whole residual sub-blocks (attention or MLP): the branch becomes identity.

A residual block is an `Add(skip, branch)` whose branch is computed from the skip through weights
only it uses (an attention or MLP sub-block, pre- or post-norm). Its contribution is measured on
sample inputs as RMS(branch) / RMS(skip); the blocks that contribute least are removed by wiring
the skip straight through. Cleanup then deletes the branch's now-dead nodes and weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphprune import runtime
from graphprune.errors import OptionError
from graphprune.ir import Model
from graphprune.pipeline import AnalysisManager, PassResult, RewritePass, register

logger = logging.getLogger(__name__)

#: ops whose constant inputs are weights that make a branch a block
WEIGHTED_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})


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


def contributions(model: Model, blocks: list[ResidualBlock], seed: int = 0) -> np.ndarray:
    """RMS(branch) / RMS(skip) of every block on seeded sample inputs."""
    names = list(dict.fromkeys(t.name for b in blocks for t in (b.branch, b.skip)))
    tensors = model.tensors()
    proto = runtime.with_outputs(model.to_onnx(), {name: tensors[name].dtype for name in names})
    feeds = runtime.sample_inputs(proto, seed=seed)
    values = dict(zip(names, runtime.session(proto).run(names, feeds), strict=True))

    def rms(array: np.ndarray) -> float:
        return float(np.sqrt(np.mean(np.square(array, dtype=np.float64))))

    return np.array([rms(values[b.branch.name]) / max(rms(values[b.skip.name]), 1e-12) for b in blocks])


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


@register
class DropBlocksPass(RewritePass):
    """Remove the `count` residual sub-blocks that contribute least.

    Reads: the graph, and an ORT run on seeded sample inputs (contribution = RMS(branch) /
    RMS(skip) at each residual Add). Changes: the chosen Adds pass their skip input through; the
    branch's nodes become dead (run cleanup afterwards). Preserves: graph inputs/outputs and their
    shapes. Options: count (number of blocks to remove, fewer than the blocks found); seed (of the
    sample inputs).
    """

    name = "drop-blocks"
    aliases = ("drop",)
    Options = DropOptions

    def check(self, model: Model, am: AnalysisManager) -> None:
        if self.options.count < 0:
            raise OptionError(f"drop-blocks count must be >= 0, got {self.options.count}")

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
        scores = contributions(model, blocks, self.options.seed)
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
