"""drop-blocks: which Adds are residual blocks, what belongs to a branch, and chained drops."""

from __future__ import annotations

import numpy as np
import pytest

import graphprune
from graphprune import runtime
from graphprune.errors import OptionError
from graphprune.passes.drop_blocks import drop, find_blocks
from graphprune.testing import model_from_text

HEADER = '<ir_version: 10, opset_import: ["" : 20]>\n'

CHAIN = HEADER + """
# weights: w1 w2 w3
g (float[2, 8] x, float[8, 8] w1, float[8, 8] w2, float[8, 8] w3) => (float[2, 8] c)
{
  s2 = MatMul (x, w1)
  p = MatMul (s2, w2)
  a = Add (s2, p)
  b = Add (a, x)
  r = MatMul (b, w3)
  c = Add (b, r)
}"""


def _blocks(text: str):
    model = model_from_text(text)
    model.infer_shapes()
    return model, find_blocks(model)


def test_a_dropped_block_that_is_another_blocks_branch_leaves_the_right_skip() -> None:
    """b = a + x has the block a = s2 + s2·w2 as its branch; dropping both must leave
    c = x + x·w3, not s2 + s2·w3."""
    model, blocks = _blocks(CHAIN)
    assert [(b.add.outputs[0].name, b.skip.name, b.branch.name) for b in blocks] == \
        [("a", "s2", "p"), ("b", "x", "a"), ("c", "b", "r")]
    for block in blocks[:2]:
        drop(model, block)
    model.graph.cleanup()
    proto = model.to_onnx()
    feeds = runtime.sample_inputs(proto)
    w3 = model.constants()["w3"].values
    np.testing.assert_allclose(runtime.run(proto, feeds)[0], feeds["x"] + feeds["x"] @ w3, rtol=1e-5, atol=1e-6)


def test_a_branch_holds_only_what_lies_between_the_skip_and_the_add() -> None:
    model, blocks = _blocks(HEADER + """
    # weights: w0 w1 w2
    g (float[2, 8] x, float[8, 8] w0, float[8, 8] w1, float[8, 8] w2) => (float[2, 8] y)
    {
      h = MatMul (x, w0)
      r = Relu (h)
      a = Add (h, r)
      m = MatMul (a, w1)
      n = MatMul (m, w2)
      y = Add (a, n)
    }""")
    # a = h + relu(h) has no weights of its own (w0 computes the skip): not a block
    assert [(b.add.outputs[0].name, sorted(n.outputs[0].name for n in b.nodes)) for b in blocks] == \
        [("y", ["m", "n"])]


def test_dropping_a_block_whose_add_is_the_graph_output() -> None:
    model, blocks = _blocks(CHAIN)
    drop(model, blocks[2])  # c = b + b·w3 becomes c = b
    model.graph.cleanup()
    proto = model.to_onnx()
    feeds = runtime.sample_inputs(proto)
    consts = model.constants()
    s2 = feeds["x"] @ consts["w1"].values
    np.testing.assert_allclose(runtime.run(proto, feeds)[0], s2 + s2 @ consts["w2"].values + feeds["x"],
                               rtol=1e-5, atol=1e-6)
    assert "w3" not in model.constants()
    report = graphprune.prune(model_from_text(CHAIN), "drop-blocks{count=2},cleanup,verify")
    assert report.verified and report.params_after == report.params_before - 2 * 64


def test_no_residual_block_is_a_clear_error() -> None:
    model = model_from_text(HEADER + """
    # weights: w1
    g (float[2, 8] x, float[8, 8] w1) => (float[2, 8] y)
    {
      y = MatMul (x, w1)
    }""")
    with pytest.raises(OptionError, match="has no residual block"):
        graphprune.prune(model, "drop-blocks{count=1},cleanup,verify")


def test_block_influence_is_one_minus_the_mean_cosine_of_the_stream_before_and_after() -> None:
    """ShortGPT's Block Influence per residual block, over every row of the calibration data; the
    pass drops the block of least influence (it may differ from the least RMS ratio)."""
    from graphprune.calib import random_calibration
    from graphprune.passes.drop_blocks import contributions

    model, blocks = _blocks(CHAIN.replace("float[2, 8] x", "float[N, 8] x").replace("float[2, 8] c", "float[N, 8] c"))
    feeds = random_calibration(model.to_onnx(), samples=40, seed=1)
    names = [t.name for b in blocks for t in (b.skip, b.branch)]
    proto = runtime.with_outputs(model.to_onnx(), dict.fromkeys(names, np.float32))
    values = dict(zip(names, runtime.session(proto).run(names, feeds), strict=True))
    expected = []
    for block in blocks:
        skip = values[block.skip.name].astype(np.float64)
        out = skip + values[block.branch.name]
        cosines = np.sum(skip * out, axis=1) / (np.linalg.norm(skip, axis=1) * np.linalg.norm(out, axis=1))
        expected.append(1 - cosines.mean())
    influence = contributions(model, blocks, metric="influence", feeds=feeds)
    np.testing.assert_allclose(influence, expected, rtol=1e-5)
    rms = contributions(model, blocks, metric="rms", feeds=feeds)
    assert rms.shape == influence.shape and not np.allclose(rms, influence)
    report = graphprune.prune(model, drop_blocks=1, calibration=feeds)
    dropped = next(p.stats for p in report.passes if p.name == "drop-blocks")["blocks_dropped"]
    assert [d["block"] for d in dropped] == [blocks[int(np.argmin(expected))].name]
    with pytest.raises(OptionError, match="metric"):
        graphprune.prune(model, pipeline="drop{count=1,metric=cosine},cleanup")
