"""Dependency analysis edge cases that are not golden text: symbolic sizes, lossless safety."""

from __future__ import annotations

import numpy as np

import graphprune
from graphprune.testing import model_from_text

HEADER = '<ir_version: 10, opset_import: ["" : 20]>\n'


def test_cut_slot_coupled_to_a_symbolic_size_is_frozen_not_a_crash() -> None:
    model = model_from_text(HEADER + """
    # weights: w1 w2
    g (float[N, 4] x, float[4, 3] w1, float[4, 5] w2, float[M, K] z) => (float[N, M] y)
    {
      h1 = MatMul (x, w1)
      h2 = MatMul (x, w2)
      a = Concat <axis = 1> (h1, h2)
      zt = Transpose <perm = [1, 0]> (z)
      y = MatMul (a, zt)
    }""")
    deps = graphprune.inspect(model)
    assert not deps.prunable
    frozen = [g for g in deps.weight_groups if any(m.tensor in ("w1", "w2") and m.axis == 1 for m in g.members)]
    assert frozen and all("unknown size" in "; ".join(g.frozen) for g in frozen)


def test_units_contracted_between_activations_are_not_removed_by_threshold_zero() -> None:
    # sigmoid(0) = 0.5: a unit with a zero weight column still adds 0.25 to every Gram entry
    model = model_from_text(HEADER + """
    # weights: w
    g (float[N, 4] x, float[4, 3] w) => (float[N, N] y)
    {
      h = MatMul (x, w)
      s = Sigmoid (h)
      t = Transpose <perm = [1, 0]> (s)
      y = MatMul (s, t)
    }""")
    values = np.asarray(model.constants()["w"].values).copy()
    values[:, 1] = 0
    model.constants()["w"].values = values
    (group,) = [g for g in graphprune.inspect(model).weight_groups if g.units == 3]
    assert not group.exact
    report = graphprune.prune(model, threshold=0.0)
    assert report.verified and report.params_after == report.params_before


def test_threshold_zero_leaves_normalized_groups_alone_but_a_positive_threshold_prunes_them() -> None:
    text = HEADER + """
    # weights: w1 b1 g b w2
    g (float[N, 4] x, float[6, 4] w1, float[6] b1, float[6] g, float[6] b, float[2, 6] w2) => (float[N, 2] y)
    {
      h = Gemm <transB = 1> (x, w1, b1)
      n = LayerNormalization (h, g, b)
      y = Gemm <transB = 1> (n, w2)
    }"""

    def dead_model():
        model = model_from_text(text)
        consts = model.constants()
        for name, axis in (("w1", 0), ("b1", 0), ("g", 0), ("b", 0), ("w2", 1)):
            values = np.asarray(consts[name].values).copy()
            np.moveaxis(values, axis, 0)[2] = 0
            consts[name].values = values
        return model

    model = dead_model()
    report = graphprune.prune(model, threshold=0.0)
    assert report.params_after == report.params_before  # the zero unit still shifts the mean
    model = dead_model()
    report = graphprune.prune(model, threshold=1e-9)
    assert report.params_after == report.params_before  # a normalized axis is the hidden size: opt-in
    model = dead_model()
    report = graphprune.prune(model, threshold=1e-9, prune_hidden=True)
    assert report.params_before - report.params_after == 4 + 1 + 1 + 1 + 2


def test_threshold_never_removes_every_unit() -> None:
    model = model_from_text(HEADER + """
    # weights: w1 w2
    g (float[N, 4] x, float[8, 4] w1, float[2, 8] w2) => (float[N, 2] y)
    {
      h = Gemm <transB = 1> (x, w1)
      y = Gemm <transB = 1> (h, w2)
    }""")
    for name in ("w1", "w2"):
        model.constants()[name].values = np.zeros_like(np.asarray(model.constants()[name].values))
    report = graphprune.prune(model, threshold=0.0, round_to=1)
    assert [(g["units_before"], g["units_after"]) for g in report.groups if not g["frozen"]] == [(8, 1)]
    assert report.verified
