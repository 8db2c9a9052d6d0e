"""Fuzzing: random valid graphs (MLP-style graphs, convolution stacks and attention blocks, as ONNX
text) pruned with random options. Every case must end in a verified model or a clean refusal (a
GraphpruneError); anything else is a bug. Used by tests/test_fuzz.py (CI), the property tests of
tests/test_properties_graphs.py and benchmarks/fuzz.py (1,000 cases).

Needs hypothesis (a test dependency).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

import graphprune
from graphprune.errors import GraphpruneError
from graphprune.testing import model_from_text

OPSET = '<ir_version: 10, opset_import: ["" : 20]>'


@dataclass
class Text:
    """ONNX text under construction: nodes, and weights declared as graph inputs (`# weights:`)."""

    inputs: list[str] = field(default_factory=list)
    weights: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    count: int = 0

    def fresh(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def weight(self, shape: tuple[int, ...], dtype: str = "float") -> str:
        name = self.fresh("w")
        self.inputs.append(f"{dtype}[{', '.join(map(str, shape))}] {name}")
        self.weights.append(name)
        return name

    def ints(self, values: list[int]) -> str:
        name = self.fresh("k")
        self.lines.append(f"{name} = Constant <value = int64[{len(values)}] {{{', '.join(map(str, values))}}}> ()")
        return name

    def node(self, text: str) -> None:
        self.lines.append(text)

    def render(self, graph_input: str, graph_output: str) -> str:
        args = ", ".join([graph_input, *self.inputs])
        return (f"# weights: {' '.join(self.weights)}\n{OPSET}\n"
                f"g ({args}) => ({graph_output})\n{{\n  " + "\n  ".join(self.lines) + "\n}\n")


MLP_BLOCKS = ("linear", "split_concat", "slice", "residual", "branches", "scale")


@st.composite
def mlp_graphs(draw: st.DrawFn) -> str:
    """x[N, W] through 1-4 blocks: Gemm layers, Split/Concat (halves swapped), a Slice of a fresh
    layer (so units on both sides of the range are prunable), residual Adds, two Gemm branches
    concatenated, per-feature scales; then a Gemm head."""
    t = Text()
    width = first = draw(st.integers(2, 6))
    current = "x"

    def gemm(source: str, width_in: int, width_out: int, activation: str | None) -> str:
        w, b, out = t.weight((width_out, width_in)), t.weight((width_out,)), t.fresh("g")
        t.node(f"{out} = Gemm <transB = 1> ({source}, {w}, {b})")
        if activation is None:
            return out
        act = t.fresh("a")
        t.node(f"{act} = {activation} ({out})")
        return act

    for _ in range(draw(st.integers(1, 4))):
        block = draw(st.sampled_from(MLP_BLOCKS))
        if block == "linear" or width < 2:
            new = draw(st.integers(2, 12))
            current, width = gemm(current, width, new, draw(st.sampled_from(("Relu", "Tanh", None)))), new
        elif block == "split_concat":
            head = draw(st.integers(1, width - 1))
            sizes, a, b, c = t.ints([head, width - head]), t.fresh("s"), t.fresh("s"), t.fresh("c")
            t.node(f"{a}, {b} = Split <axis = 1> ({current}, {sizes})")
            t.node(f"{c} = Concat <axis = 1> ({b}, {a})")
            current = c
        elif block == "slice":
            new = draw(st.integers(2, 12))
            current, width = gemm(current, width, new, "Relu"), new
            start = draw(st.integers(0, width - 1))
            stop = draw(st.integers(start + 1, width))
            begin = start - width if draw(st.booleans()) else start  # negative starts count from the end
            bounds, out = [t.ints([begin]), t.ints([stop]), t.ints([1])], t.fresh("sl")
            t.node(f"{out} = Slice ({current}, {', '.join(bounds)})")
            current, width = out, stop - start
        elif block == "residual":
            inner = draw(st.integers(2, 10))
            back, total = gemm(gemm(current, width, inner, "Relu"), inner, width, None), t.fresh("r")
            t.node(f"{total} = Add ({current}, {back})")
            current = total
        elif block == "branches":
            left, right = draw(st.integers(1, 6)), draw(st.integers(1, 6))
            a, b = gemm(current, width, left, None), gemm(current, width, right, "Sigmoid")
            c = t.fresh("c")
            t.node(f"{c} = Concat <axis = 1> ({a}, {b})")
            current, width = c, left + right
        else:
            scale, out = t.weight((width,)), t.fresh("m")
            t.node(f"{out} = Mul ({current}, {scale})")
            current = out
    classes = draw(st.integers(1, 4))
    w = t.weight((classes, width))
    t.node(f"y = Gemm <transB = 1> ({current}, {w})")
    return t.render(f"float[N, {first}] x", f"float[N, {classes}] y")


@st.composite
def conv_graphs(draw: st.DrawFn) -> str:
    """x[N, C, 8, 8] through conv blocks (plain, residual, concat branches, depthwise, pooling), then
    global pooling and a linear head."""
    t = Text()
    channels = draw(st.integers(1, 4))
    first = channels
    current = "x"
    for _ in range(draw(st.integers(1, 4))):
        block = draw(st.sampled_from(("conv", "residual", "branches", "depthwise", "pool")))
        if block == "conv" or (block == "residual" and channels < 1):
            new = draw(st.integers(2, 8))
            kernel = draw(st.sampled_from((1, 3)))
            w, b, out = t.weight((new, channels, kernel, kernel)), t.weight((new,)), t.fresh("c")
            t.node(f"{out} = Conv <pads = [{kernel // 2}, {kernel // 2}, {kernel // 2}, {kernel // 2}]> "
                   f"({current}, {w}, {b})")
            act = t.fresh("a")
            t.node(f"{act} = {draw(st.sampled_from(('Relu', 'Sigmoid', 'Tanh')))} ({out})")
            current, channels = act, new
        elif block == "residual":
            inner = draw(st.integers(2, 8))
            w1, w2 = t.weight((inner, channels, 3, 3)), t.weight((channels, inner, 1, 1))
            c1, a1, c2, total = t.fresh("c"), t.fresh("a"), t.fresh("c"), t.fresh("r")
            t.node(f"{c1} = Conv <pads = [1, 1, 1, 1]> ({current}, {w1})")
            t.node(f"{a1} = Relu ({c1})")
            t.node(f"{c2} = Conv ({a1}, {w2})")
            t.node(f"{total} = Add ({current}, {c2})")
            current = total
        elif block == "branches":
            left, right = draw(st.integers(1, 5)), draw(st.integers(1, 5))
            wl, wr = t.weight((left, channels, 1, 1)), t.weight((right, channels, 3, 3))
            a, b, c = t.fresh("c"), t.fresh("c"), t.fresh("cat")
            t.node(f"{a} = Conv ({current}, {wl})")
            t.node(f"{b} = Conv <pads = [1, 1, 1, 1]> ({current}, {wr})")
            t.node(f"{c} = Concat <axis = 1> ({a}, {b})")
            current, channels = c, left + right
        elif block == "depthwise":
            w, out = t.weight((channels, 1, 3, 3)), t.fresh("dw")
            t.node(f"{out} = Conv <group = {channels}, pads = [1, 1, 1, 1]> ({current}, {w})")
            current = out
        else:
            out = t.fresh("p")
            t.node(f"{out} = MaxPool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> ({current})")
            current = out
    pooled, flat = t.fresh("gap"), t.fresh("f")
    t.node(f"{pooled} = GlobalAveragePool ({current})")
    t.node(f"{flat} = Flatten ({pooled})")
    classes = draw(st.integers(2, 5))
    w = t.weight((channels, classes))
    t.node(f"y = MatMul ({flat}, {w})")
    return t.render(f"float[N, {first}, 8, 8] x", f"float[N, {classes}] y")


@st.composite
def attention_graphs(draw: st.DrawFn) -> str:
    """x[N, 4, D] through 1-2 pre-norm transformer blocks: multi-head self-attention (separate Q/K/V,
    reshape to heads, softmax, output projection, residual) and an FFN (residual)."""
    t = Text()
    heads, head_dim = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    width = draw(st.integers(2, 8))
    current = "x"
    for _ in range(draw(st.integers(1, 2))):
        scale, bias, normed = t.weight((width,)), t.weight((width,)), t.fresh("ln")
        t.node(f"{normed} = LayerNormalization <axis = -1> ({current}, {scale}, {bias})")
        split, merge = t.ints([0, 0, heads, head_dim]), t.ints([0, 0, heads * head_dim])
        projected = {}
        for role in ("q", "k", "v"):
            w, mm, shaped, moved = t.weight((width, heads * head_dim)), t.fresh(role), t.fresh(role), t.fresh(role)
            t.node(f"{mm} = MatMul ({normed}, {w})")
            t.node(f"{shaped} = Reshape ({mm}, {split})")
            perm = "[0, 2, 3, 1]" if role == "k" else "[0, 2, 1, 3]"
            t.node(f"{moved} = Transpose <perm = {perm}> ({shaped})")
            projected[role] = moved
        scores, probs, ctx, back, merged = (t.fresh(s) for s in ("s", "p", "ctx", "b", "m"))
        t.node(f"{scores} = MatMul ({projected['q']}, {projected['k']})")
        t.node(f"{probs} = Softmax <axis = -1> ({scores})")
        t.node(f"{ctx} = MatMul ({probs}, {projected['v']})")
        t.node(f"{back} = Transpose <perm = [0, 2, 1, 3]> ({ctx})")
        t.node(f"{merged} = Reshape ({back}, {merge})")
        wo, attn, res = t.weight((heads * head_dim, width)), t.fresh("o"), t.fresh("r")
        t.node(f"{attn} = MatMul ({merged}, {wo})")
        t.node(f"{res} = Add ({current}, {attn})")
        hidden = draw(st.integers(2, 12))
        w1, w2 = t.weight((width, hidden)), t.weight((hidden, width))
        up, act, down, out = t.fresh("u"), t.fresh("g"), t.fresh("d"), t.fresh("r")
        t.node(f"{up} = MatMul ({res}, {w1})")
        t.node(f"{act} = {draw(st.sampled_from(('Relu', 'Gelu', 'Sigmoid')))} ({up})")
        t.node(f"{down} = MatMul ({act}, {w2})")
        t.node(f"{out} = Add ({res}, {down})")
        current = out
    t.node(f"y = Identity ({current})")
    return t.render(f"float[N, 4, {width}] x", f"float[N, 4, {width}] y")


@st.composite
def prune_options(draw: st.DrawFn) -> dict:
    """Random structured options for `graphprune.prune`."""
    options = {"ratio": draw(st.floats(0.0, 0.9)), "round_to": draw(st.sampled_from((None, 1, 2, 4))),
               "importance": draw(st.sampled_from(("l1", "l2", "random", "activation", "taylor", "fisher", "obs"))),
               "allocation": draw(st.sampled_from(("uniform", "global")))}
    if options["importance"] not in ("l1", "l2", "random"):
        options["reconstruct"] = draw(st.booleans())
    return options


@dataclass(frozen=True)
class Outcome:
    verdict: str  # "verified" or "refused: <message>"
    params_before: int
    params_after: int


def run_case(text: str, options: dict) -> Outcome:
    """Prune one generated graph; a GraphpruneError is a clean refusal, any other exception
    propagates (a bug), and so does an unverified or larger result."""
    model = model_from_text(text)
    params = model.param_count()
    try:
        report = graphprune.prune(model, seed=0, **options)
    except GraphpruneError as exc:
        return Outcome(f"refused: {exc}", params, params)
    if not report.verified or model.param_count() > params:
        raise AssertionError(f"prune returned an unverified or larger model for options {options}")
    return Outcome("verified", params, model.param_count())
