"""cleanup-graph: folds constant subgraphs, removes dead nodes, keeps outputs identical."""

from __future__ import annotations

import numpy as np

import graphprune
from graphprune import runtime
from graphprune.testing import model_from_text

CASE = """
# weights: w a b
<ir_version: 10, opset_import: ["" : 20]>
cleanup (float[N, 4] x, float[4, 4] w, float[4] a, float[4] b) => (float[N, 4] y)
{
  scale = Add (a, b)
  h = MatMul (x, w)
  y = Mul (h, scale)
  unused = Relu (h)
}
"""


def test_cleanup_folds_and_drops_dead_nodes() -> None:
    model = model_from_text(CASE)
    proto = model.to_onnx()
    feeds = runtime.sample_inputs(proto)
    (before,) = runtime.run(proto, feeds)
    report = graphprune.prune(model, "cleanup")
    assert sorted(n.op for n in model.graph.nodes) == ["MatMul", "Mul"]
    assert report.passes[0].modified and report.passes[0].stats["nodes_removed"] == 2
    (after,) = runtime.run(model.to_onnx(), feeds)
    np.testing.assert_array_equal(after, before)
    again = graphprune.prune(model, "cleanup")
    assert not again.passes[0].modified
