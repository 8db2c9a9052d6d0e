"""Rewrites through Concat, Split and Slice: exact dead-unit removal and fixed size constants.

Each case zeroes some units (all of their weights), prunes with threshold 0 and checks: the
change happened (shapes and constants), the outputs are identical, a second run changes nothing.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

import graphprune
from graphprune import runtime
from graphprune.testing import model_from_text

HEADER = '<ir_version: 10, opset_import: ["" : 20]>\n'


def _zero(model, **cuts) -> None:
    """cuts: tensor name -> (axis, indices) to zero."""
    consts = model.constants()
    for name, (axis, indices) in cuts.items():
        values = np.asarray(consts[name].values).copy()
        index = [slice(None)] * values.ndim
        index[axis] = list(indices)
        values[tuple(index)] = 0
        consts[name].values = values


def _prune_exact(model):
    proto = model.to_onnx()
    feeds = runtime.sample_inputs(proto, seed=1, dynamic_dim=5)
    before = runtime.run(proto, feeds)
    report = graphprune.prune(model, threshold=0.0)
    after = runtime.run(model.to_onnx(), feeds)
    assert [a.shape for a in after] == [b.shape for b in before]
    for a, b in zip(after, before, strict=True):
        assert np.max(np.abs(a - b)) <= 1e-6 * max(1.0, float(np.max(np.abs(b))))
    params = model.param_count()
    again = graphprune.prune(model, threshold=0.0)
    assert again.params_after == params and not next(p for p in again.passes if p.name == "prune-units").modified
    return report


def _shape(model, name: str) -> tuple[int, ...]:
    return tuple(np.asarray(model.constants()[name].values).shape)


def test_concat_of_two_branches() -> None:
    model = model_from_text(HEADER + """
    # weights: wa ba wb bb wc bc
    concat (float[N, 3] x, float[4, 3] wa, float[4] ba, float[5, 3] wb, float[5] bb, float[2, 9] wc, float[2] bc)
      => (float[N, 2] y)
    {
      a = Gemm <transB = 1> (x, wa, ba)
      b = Gemm <transB = 1> (x, wb, bb)
      c = Concat <axis = 1> (a, b)
      r = Relu (c)
      y = Gemm <transB = 1> (r, wc, bc)
    }""")
    wc = np.asarray(model.constants()["wc"].values).copy()
    _zero(model, wa=(0, [1]), ba=(0, [1]), wb=(0, [2]), bb=(0, [2]), wc=(1, [1, 4 + 2]))
    report = _prune_exact(model)
    assert report.params_before - report.params_after == 2 * (3 + 1 + 2)
    assert _shape(model, "wa") == (3, 3) and _shape(model, "wb") == (4, 3) and _shape(model, "wc") == (2, 7)
    kept = [0, 2, 3, 4, 5, 7, 8]
    assert np.array_equal(np.asarray(model.constants()["wc"].values), wc[:, kept])


def test_split_into_branches_updates_split_sizes() -> None:
    model = model_from_text(HEADER + """
    # weights: w b s wa wb
    split (float[N, 3] x, float[10, 3] w, float[10] b, int64[2] s, float[2, 4] wa, float[2, 6] wb)
      => (float[N, 2] y)
    {
      h = Gemm <transB = 1> (x, w, b)
      p, q = Split <axis = 1> (h, s)
      rp = Relu (p)
      rq = Tanh (q)
      ya = Gemm <transB = 1> (rp, wa)
      yb = Gemm <transB = 1> (rq, wb)
      y = Add (ya, yb)
    }""")
    model.constants()["s"].values = np.array([4, 6], np.int64)
    _zero(model, w=(0, [0, 7]), b=(0, [0, 7]), wa=(1, [0]), wb=(1, [3]))
    report = _prune_exact(model)
    assert report.params_before - report.params_after == 2 * (3 + 1 + 2)
    split = next(n for n in model.graph.nodes if n.op == "Split")
    assert list(np.asarray(split.inputs[1].values)) == [3, 5]
    assert _shape(model, "wa") == (2, 3) and _shape(model, "wb") == (2, 5)


def test_slice_of_a_channel_range_updates_bounds() -> None:
    model = model_from_text(HEADER + """
    # weights: w b starts ends axes w2
    slice (float[N, 3] x, float[8, 3] w, float[8] b, int64[1] starts, int64[1] ends, int64[1] axes,
           float[2, 5] w2) => (float[N, 2] y)
    {
      h = Gemm <transB = 1> (x, w, b)
      s = Slice (h, starts, ends, axes)
      y = Gemm <transB = 1> (s, w2)
    }""")
    consts = model.constants()
    consts["starts"].values, consts["ends"].values = np.array([2], np.int64), np.array([7], np.int64)
    consts["axes"].values = np.array([1], np.int64)
    # unit 0 is outside the slice (read by nobody downstream); unit 3 is inside, at slice position 1
    _zero(model, w=(0, [0, 3]), b=(0, [0, 3]), w2=(1, [1]))
    report = _prune_exact(model)
    assert report.params_before - report.params_after == (3 + 1) + (3 + 1 + 2)
    node = next(n for n in model.graph.nodes if n.op == "Slice")
    assert int(node.inputs[1].values[0]) == 1 and int(node.inputs[2].values[0]) == 5
    assert isinstance(node.inputs[1], gs.Constant) and _shape(model, "w2") == (2, 4)


def test_ratio_pruning_through_concat_prunes_each_branch() -> None:
    model = model_from_text(HEADER + """
    # weights: wa wb wc
    concat (float[N, 3] x, float[8, 3] wa, float[4, 3] wb, float[2, 12] wc) => (float[N, 2] y)
    {
      a = Gemm <transB = 1> (x, wa)
      b = Gemm <transB = 1> (x, wb)
      c = Concat <axis = 1> (a, b)
      y = Gemm <transB = 1> (c, wc)
    }""")
    report = graphprune.prune(model, ratio=0.5)
    assert report.verified
    assert _shape(model, "wa") == (4, 3) and _shape(model, "wb") == (2, 3) and _shape(model, "wc") == (2, 6)
