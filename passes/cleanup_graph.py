"""cleanup-graph: fold constants, drop dead nodes, merge equal initializers, re-infer shapes."""

from __future__ import annotations

import logging

from graphprune.ir import Model, dedupe_constants
from graphprune.pipeline import AnalysisManager, PassResult, RewritePass, register

logger = logging.getLogger(__name__)


@register
class CleanupGraphPass(RewritePass):
    """Tidy the graph after rewrites.

    Reads/Changes: constant subgraphs are folded (onnx-graphsurgeon, evaluated by ORT), nodes and
    tensors no output depends on are removed, initializers with equal bytes are merged again
    (undoing `unshare-constants` where nothing diverged), nodes are topologically sorted and
    shapes re-inferred. Preserves: outputs exactly (lossless). Options: none.
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
        graph.fold_constants(error_ok=True, fold_shapes=not sliced_shape)
        graph.cleanup(remove_unused_graph_inputs=False)
        merged = dedupe_constants(model)
        graph.cleanup(remove_unused_graph_inputs=False)
        graph.toposort()
        model.infer_shapes()
        stats = {"nodes_removed": nodes_before - len(graph.nodes),
                 "tensors_removed": tensors_before - len(graph.tensors()),
                 "constants_merged": merged}
        modified = any(stats.values())
        return PassResult(modified, stats)
