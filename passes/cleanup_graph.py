"""cleanup-graph: fold constants, drop dead nodes, merge equal initializers, re-infer shapes."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import onnx_graphsurgeon as gs

from graphprune.ir.model import Model, dedupe_constants
from graphprune.pipeline import AnalysisManager, PassResult, RewritePass, register

logger = logging.getLogger(__name__)


#: a folded constant at least this big that leaves its source in place would add its bytes
SHARED_FOLD_BYTES = 1 << 20


@contextmanager
def _shared_weights_kept(model: Model) -> Iterator[None]:
    """While folding: nodes that compute a large tensor from a weight something else also reads
    (a tied LM head: Transpose of the embedding table) are hidden from the folder, so the model
    keeps one table and never grows."""
    readers: dict[str, int] = {}
    for node in model.graph.nodes:
        for tensor in {t.name: t for t in node.inputs if isinstance(t, gs.Constant)}.values():
            readers[tensor.name] = readers.get(tensor.name, 0) + 1
    hidden, stand_ins = [], {}
    for node in model.graph.nodes:
        for index, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant) and readers[tensor.name] > 1 and tensor.values.nbytes >= SHARED_FOLD_BYTES:
                if tensor.name not in stand_ins:
                    stand_ins[tensor.name] = gs.Variable(f"{tensor.name}::kept", dtype=tensor.dtype, shape=tensor.shape)
                node.inputs[index] = stand_ins[tensor.name]
                hidden.append((node, index, tensor))
    try:
        yield
    finally:
        for node, index, tensor in hidden:
            node.inputs[index] = tensor


@register
class CleanupGraphPass(RewritePass):
    """Tidy the graph after rewrites.

    Reads/Changes: constant subgraphs are folded (onnx-graphsurgeon, evaluated by ORT), nodes and
    tensors no output depends on are removed, initializers with equal bytes are merged again
    (undoing `unshare-constants` where nothing diverged), nodes are topologically sorted and
    shapes re-inferred. A large weight that several nodes read is not folded into a second copy
    (a tied embedding and LM head stay one table). Preserves: outputs exactly (lossless). Options:
    none.
    """

    name = "cleanup-graph"
    aliases = ("cleanup",)

    @property
    def lossless(self) -> bool:
        return True

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        graph = model.graph
        nodes_before = len(graph.nodes)
        tensors_before = len(graph.tensors())
        # onnx-graphsurgeon folds Shape <start, end> as if it read every axis: let such graphs keep
        # their Shape nodes rather than get a wrong constant
        sliced_shape = any(n.op == "Shape" and ("start" in n.attrs or "end" in n.attrs) for n in graph.nodes)
        merged = dedupe_constants(model)  # copies `unshare-constants` made that stayed equal are one again
        with _shared_weights_kept(model):
            graph.fold_constants(error_ok=True, fold_shapes=not sliced_shape)
        graph.cleanup(remove_unused_graph_inputs=False)
        merged += dedupe_constants(model)
        graph.cleanup(remove_unused_graph_inputs=False)
        graph.toposort()
        model.infer_shapes()
        stats = {"nodes_removed": nodes_before - len(graph.nodes),
                 "tensors_removed": tensors_before - len(graph.tensors()),
                 "constants_merged": merged}
        modified = any(stats.values())
        return PassResult(modified, stats)
