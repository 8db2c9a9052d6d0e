"""Property tests over random graphs beyond chains: Split/Concat, Slice, residual Adds, branches,
per-channel scales. Every random graph must (1) prune at any ratio into a verified model and
(2) lose exactly its dead units, with identical outputs, under `threshold=0`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import graphprune
from graphprune.fuzz import Text
from graphprune.testing import check_dead_unit_removal, model_from_text

SETTINGS = settings(max_examples=40, deadline=None)
BLOCKS = ("linear", "split_concat", "slice", "residual", "branches", "scale")


@dataclass
class Builder(Text):
    """Writes ONNX text for 2-D graphs: `Text` plus the current feature width."""

    input_width: int = 0
    width: int = 0

    def __post_init__(self) -> None:
        self.width = self.input_width

    def gemm(self, source: str, width: int, activation: str | None = "Relu") -> str:
        """Gemm from the current width to `width` (the caller updates `self.width`)."""
        w, b, out = self.weight((width, self.width)), self.weight((width,)), self.fresh("g")
        self.node(f"{out} = Gemm <transB = 1> ({source}, {w}, {b})")
        if activation:
            act = self.fresh("a")
            self.node(f"{act} = {activation} ({out})")
            out = act
        return out

    def text(self, out_width: int) -> str:
        return self.render(f"float[N, {self.input_width}] x", f"float[N, {out_width}] y")


@st.composite
def graphs(draw: st.DrawFn) -> str:
    width = draw(st.integers(2, 6))
    builder = Builder(input_width=width)
    current = "x"
    for _ in range(draw(st.integers(1, 4))):
        block = draw(st.sampled_from(BLOCKS))
        if block == "linear" or builder.width < 2:
            new = draw(st.integers(2, 12))
            current, builder.width = builder.gemm(current, new, draw(st.sampled_from(("Relu", "Tanh", None)))), new
        elif block == "split_concat":
            first = draw(st.integers(1, builder.width - 1))
            sizes = builder.weight((2,), "int64")
            a, b, c = builder.fresh("s"), builder.fresh("s"), builder.fresh("c")
            builder.node(f"{a}, {b} = Split <axis = 1> ({current}, {sizes})")
            builder.node(f"{c} = Concat <axis = 1> ({b}, {a})")
            builder.lines.insert(0, f"# split {sizes} {first} {builder.width - first}")
            current = c
        elif block == "slice":
            # slice a fresh layer, so units on both sides of the range are prunable
            new = draw(st.integers(2, 12))
            current, builder.width = builder.gemm(current, new, "Relu"), new
            start = draw(st.integers(0, builder.width - 1))
            stop = draw(st.integers(start + 1, builder.width))
            negative = draw(st.booleans())
            bounds = builder.weight((1,), "int64"), builder.weight((1,), "int64"), builder.weight((1,), "int64")
            out = builder.fresh("sl")
            builder.node(f"{out} = Slice ({current}, {bounds[0]}, {bounds[1]}, {bounds[2]})")
            begin = start - builder.width if negative else start
            builder.lines.insert(0, f"# slice {' '.join(bounds)} {begin} {stop} 1")
            current, builder.width = out, stop - start
        elif block == "residual":
            inner_width = draw(st.integers(2, 10))
            inner = builder.gemm(current, inner_width)
            width, builder.width = builder.width, inner_width
            back, total = builder.gemm(inner, width, None), builder.fresh("r")
            builder.node(f"{total} = Add ({current}, {back})")
            current, builder.width = total, width
        elif block == "branches":
            left, right = draw(st.integers(1, 6)), draw(st.integers(1, 6))
            a = builder.gemm(current, left, None)
            b = builder.gemm(current, right, "Sigmoid")
            c = builder.fresh("c")
            builder.node(f"{c} = Concat <axis = 1> ({a}, {b})")
            current, builder.width = c, left + right
        else:
            scale, out = builder.weight((builder.width,)), builder.fresh("m")
            builder.node(f"{out} = Mul ({current}, {scale})")
            current = out
    out_width = draw(st.integers(1, 4))
    w = builder.weight((out_width, builder.width))
    builder.node(f"y = Gemm <transB = 1> ({current}, {w})")
    return builder.text(out_width)


def _model(text: str):
    """Parse a generated graph and give its int64 operands (sizes, slice bounds) their values."""
    model = model_from_text(text)
    consts = model.constants()
    for line in text.splitlines():
        line = line.strip()
        parts = line.split()
        if line.startswith("# split"):
            consts[parts[2]].values = np.array([int(parts[3]), int(parts[4])], np.int64)
        elif line.startswith("# slice"):
            for name, value in zip(parts[2:5], (parts[5], parts[6], parts[7]), strict=True):
                consts[name].values = np.array([int(value)], np.int64)
    return model


@SETTINGS
@given(text=graphs(), ratio=st.floats(0.0, 0.9), round_to=st.sampled_from((1, 2, 4)))
def test_random_graphs_prune_into_verified_models(text: str, ratio: float, round_to: int) -> None:
    model = _model(text)
    prunable = graphprune.inspect(model).prunable
    report = graphprune.prune(model, ratio=ratio, round_to=round_to)
    assert report.verified
    assert report.params_after <= report.params_before
    if prunable and ratio >= 0.5 and round_to == 1:
        assert report.params_after < report.params_before


@SETTINGS
@given(text=graphs(), seed=st.integers(0, 2**16))
def test_random_graphs_lose_exactly_their_dead_units(text: str, seed: int) -> None:
    rng = np.random.default_rng(seed)

    def choose(group) -> set[int]:
        count = int(rng.integers(0, group.units))  # fewer than all
        return set(rng.choice(group.units, size=count, replace=False).tolist())

    check_dead_unit_removal(_model(text), choose)
