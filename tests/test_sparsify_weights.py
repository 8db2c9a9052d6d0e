"""sparsify-weights: zeroes small weights, never divisors or norm statistics; idempotent."""

from __future__ import annotations

import numpy as np

import graphprune
from graphprune import runtime
from graphprune.testing import model_from_text

CASE = """
# weights: w d w2
<ir_version: 10, opset_import: ["" : 20]>
div (float[N, 4] x, float[4, 3] w, float[1, 3] d, float[3, 2] w2) => (float[N, 2] y)
{
  h = MatMul (x, w)
  s = Div (h, d)
  y = MatMul (s, w2)
}
"""


def test_divisors_are_not_weights() -> None:
    model = model_from_text(CASE)
    model.constants()["d"].values = np.array([[1.0, 0.01, 1.0]], np.float32)
    report = graphprune.prune(model, weight_threshold=0.05)
    assert np.array_equal(np.asarray(model.constants()["d"].values), np.array([[1.0, 0.01, 1.0]], np.float32))
    (y,) = runtime.run(model.to_onnx(), runtime.sample_inputs(model.to_onnx()))
    assert report.verified and np.all(np.isfinite(y))


def test_sparsity_is_reported_and_a_second_run_changes_nothing() -> None:
    model = model_from_text(CASE)
    report = graphprune.prune(model, sparsity=0.5)
    stats = report.passes[0].stats
    zeros = sum(int(np.count_nonzero(np.asarray(model.constants()[n].values) == 0)) for n in ("w", "w2"))
    assert stats["zeroed"] == zeros == 6 + 3 and stats["weights"] == 18 and stats["sparsity"] == 0.5
    again = graphprune.prune(model, sparsity=0.5)
    assert not again.passes[0].modified and again.passes[0].stats["sparsity"] == 0.5
