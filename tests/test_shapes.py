"""The factor and shape machinery on its own: `match_axes` and `common_factors` (how Reshape
pairs axes, symbolic dims included) and `shape_value` (what a Shape -> Gather -> Concat chain
computes, with the literals a rewrite may change)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from graphprune.analysis.shapes import DimOf, Lit, Opaque, Scaled, shape_value
from graphprune.ops.reshape import common_factors, match_axes


@pytest.mark.parametrize(("a", "b", "runs"), [
    ([2, 3, 4], [6, 4], [([0, 1], [0]), ([2], [1])]),                          # merge
    ([6, 4], [2, 3, 4], [([0], [0, 1]), ([1], [2])]),                          # split
    (["batch", 12, 64], ["batch", 768], [([0], [0]), ([1, 2], [1])]),          # heads merged back
    (["batch", "seq", 768], ["batch", "seq", 12, 64], [([0], [0]), ([1], [1]), ([2], [2, 3])]),
    (["batch*seq", 4], ["batch", "seq", 4], [([0], [0, 1]), ([1], [2])]),      # a symbolic product
    ([4, 1], [4], [([0], [0]), ([1], [])]),                                    # trailing ones pair with nothing
    ([4, 6], [6, 4], None),                                                    # no common boundary
    (["batch", 4], [None, 4], None),                                           # an unknown dim
])
def test_match_axes(a, b, runs) -> None:
    assert match_axes(a, b) == runs


@pytest.mark.parametrize(("a", "b", "factors"), [
    (["batch", 64], ["batch*4", 16], (["batch", 4, 16], [[0], [1, 2]], [[0, 1], [2]])),
    ([2, 6], [4, 3], ([2, 2, 3], [[0], [1, 2]], [[0, 1], [2]])),  # 4 = 2 * 2 and 6 = 2 * 3
    ([12, 64], [768], ([12, 64], [[0], [1]], [[0, 1]])),
    ([2, 3], [3, 2], None),
])
def test_common_factors(a, b, factors) -> None:
    assert common_factors(a, b) == factors


def _chain() -> tuple[gs.Tensor, gs.Node, gs.Constant]:
    """target = Concat(Gather(Shape(x), 0), [-1], Mul(Gather(Shape(x), 1), 12)) for x [batch, seq, 768]."""
    x = gs.Variable("x", np.float32, ["batch", "seq", 768])
    shape = gs.Variable("shape", np.int64, [3])
    gs.Node("Shape", "shape_of_x", inputs=[x], outputs=[shape])
    dims = []
    for axis in (0, 1):
        index = gs.Constant(f"i{axis}", np.array([axis], np.int64))
        dim = gs.Variable(f"d{axis}", np.int64, [1])
        gs.Node("Gather", f"gather{axis}", {"axis": 0}, inputs=[shape, index], outputs=[dim])
        dims.append(dim)
    twelve = gs.Constant("twelve", np.array([12], np.int64))
    scaled = gs.Variable("scaled", np.int64, [1])
    gs.Node("Mul", "times_heads", inputs=[dims[1], twelve], outputs=[scaled])
    minus_one = gs.Constant("minus_one", np.array([-1], np.int64))
    target = gs.Variable("target", np.int64, [3])
    concat = gs.Node("Concat", "concat", {"axis": 0}, inputs=[dims[0], minus_one, scaled], outputs=[target])
    return target, concat, twelve


def test_shape_value_follows_a_shape_chain() -> None:
    target, concat, twelve = _chain()
    batch, minus, scaled = shape_value(target)
    assert batch == DimOf("x", 0)
    assert isinstance(minus, Lit) and minus.value == -1 and minus.path == ((concat, 1),)
    assert isinstance(scaled, Scaled) and scaled.dim == DimOf("x", 1) and scaled.factor == 12
    # the literal 12 is found on its way, so a rewrite can change it on a copy of the path
    assert scaled.literal is not None and scaled.literal.value == 12 and scaled.literal.path[-1][1] == 1


def test_shape_value_of_constants_and_unknowns() -> None:
    constant = gs.Constant("c", np.array([2, -1, 64], np.int64))
    assert [(e.value, e.path, e.index) for e in shape_value(constant)] == [(2, (), 0), (-1, (), 1), (64, (), 2)]
    assert shape_value(gs.Variable("free", np.int64, [3])) is None  # a graph input: nothing to read
    x = gs.Variable("x", np.float32, ["batch", 8])
    shape, out = gs.Variable("s", np.int64, [2]), gs.Variable("n", np.int64, [2])
    gs.Node("Shape", inputs=[x], outputs=[shape])
    gs.Node("Neg", inputs=[shape], outputs=[out])  # an op the reader does not follow
    assert shape_value(out) is None
    summed = gs.Variable("sum", np.int64, [2])
    gs.Node("Add", inputs=[shape, shape], outputs=[summed])
    assert all(isinstance(e, Opaque | Scaled | Lit | DimOf) for e in shape_value(summed))
