"""unshare-constants: one tensor per use, outputs identical, idempotent."""

from __future__ import annotations

import numpy as np

import graphprune
from graphprune import runtime
from graphprune.testing import model_from_text

CASE = """
# weights: w b
<ir_version: 10, opset_import: ["" : 20]>
tied (float[N, 4] x, float[4, 4] w, float[4] b) => (float[N, 4] y)
{
  h = Gemm <transB = 1> (x, w, b)
  r = Relu (h)
  y = Gemm <transB = 1> (r, w, b)
}
"""


def test_unshare_splits_uses_and_keeps_outputs() -> None:
    model = model_from_text(CASE)
    proto = model.to_onnx()
    feeds = runtime.sample_inputs(proto)
    (before,) = runtime.run(proto, feeds)
    report = graphprune.prune(model, "unshare")
    assert report.passes[0].modified and report.passes[0].stats["unshared"] == 2
    first, second = (n for n in model.graph.nodes if n.op == "Gemm")
    assert first.inputs[1] is not second.inputs[1] and first.inputs[2] is not second.inputs[2]
    (after,) = runtime.run(model.to_onnx(), feeds)
    np.testing.assert_array_equal(after, before)
    assert not graphprune.prune(model, "unshare").passes[0].modified
