"""Property tests: random small MLPs built directly as ONNX, pruned by ratio and by `threshold=0`.

The generator knows every layer's width, so the expected result of pruning is computed here
independently of graphprune (only `plan.kept_count`, the documented rounding rule, is shared),
and the actual widths are read back from the pruned weights' shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune import runtime
from graphprune.ir.model import Model
from graphprune.transform.plan import kept_count

OPSET = 20
IR_VERSION = 10
ACTIVATIONS = ("Relu", "Tanh", "Sigmoid", "LeakyRelu", "Gelu", "HardSwish")
#: outputs of a lossless prune may differ by this much, relative to max |output| (absolute below 1)
TOLERANCE = 1e-6

# Every example builds, prunes and runs a few tiny ONNX Runtime sessions (~10 ms); the time varies
# with the machine, hence no deadline. No health check needs suppressing.
SETTINGS = settings(max_examples=50, deadline=None)


# -- the generator ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layer:
    kind: str  # "gemm" or "matmul" (MatMul + Add bias)
    trans_b: int  # Gemm only: the weight is [out, in] when 1, [in, out] when 0
    bias: bool  # always True for "matmul"
    activation: str | None  # None for the output layer
    alpha: float  # LeakyRelu slope
    approximate: str  # Gelu: "none" or "tanh"


@dataclass(frozen=True)
class Spec:
    dims: tuple[int, ...]  # [input, hidden..., output]
    layers: tuple[Layer, ...]  # len(dims) - 1 layers; every one but the last has an activation
    dynamic_batch: bool
    batch: int  # the static batch size, or the size fed for the dynamic one
    seed: int

    @property
    def hidden(self) -> tuple[int, ...]:
        return self.dims[1:-1]


@st.composite
def layers(draw: st.DrawFn, activation: bool) -> Layer:
    kind = draw(st.sampled_from(("gemm", "matmul")))
    trans_b = draw(st.integers(0, 1)) if kind == "gemm" else 0
    bias = draw(st.booleans()) if kind == "gemm" else True
    act = draw(st.sampled_from(ACTIVATIONS)) if activation else None
    alpha = draw(st.sampled_from((0.01, 0.1, 0.2)))
    approximate = draw(st.sampled_from(("none", "tanh")))
    return Layer(kind, trans_b, bias, act, alpha, approximate)


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    hidden = draw(st.lists(st.integers(2, 24), min_size=1, max_size=4))
    dims = (draw(st.integers(2, 8)), *hidden, draw(st.integers(1, 6)))
    mlp = tuple(draw(layers(activation=i < len(hidden))) for i in range(len(dims) - 1))
    return Spec(dims, mlp, draw(st.booleans()), draw(st.integers(1, 5)), draw(st.integers(0, 2**16)))


def weight_arrays(spec: Spec) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(weight [in, out], bias [out] or None) per layer, seeded; never exactly zero."""
    rng = np.random.default_rng(spec.seed)
    arrays = []
    for fan_in, fan_out, layer in zip(spec.dims[:-1], spec.dims[1:], spec.layers, strict=True):
        w = rng.uniform(0.1, 1.0, (fan_in, fan_out)) * rng.choice((-1.0, 1.0), (fan_in, fan_out))
        b = rng.uniform(0.1, 1.0, fan_out) * rng.choice((-1.0, 1.0), fan_out) if layer.bias else None
        arrays.append(((w / np.sqrt(fan_in)).astype(np.float32), None if b is None else b.astype(np.float32)))
    return arrays


def build(spec: Spec, arrays: list[tuple[np.ndarray, np.ndarray | None]]) -> onnx.ModelProto:
    batch = "N" if spec.dynamic_batch else spec.batch
    nodes, inits = [], []
    current = "x"
    for i, (layer, (w, b)) in enumerate(zip(spec.layers, arrays, strict=True)):
        out = f"y{i}"
        if layer.kind == "gemm":
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T if layer.trans_b else w), f"W{i}"))
            inputs = [current, f"W{i}"]
            if b is not None:
                inits.append(numpy_helper.from_array(b, f"B{i}"))
                inputs.append(f"B{i}")
            nodes.append(helper.make_node("Gemm", inputs, [out], name=f"gemm{i}", transB=layer.trans_b))
        else:
            inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
            nodes.append(helper.make_node("MatMul", [current, f"W{i}"], [f"mm{i}"], name=f"matmul{i}"))
            nodes.append(helper.make_node("Add", [f"mm{i}", f"B{i}"], [out], name=f"add{i}"))
        current = out
        if layer.activation is not None:
            attrs = {"LeakyRelu": {"alpha": layer.alpha}, "Gelu": {"approximate": layer.approximate}}
            nodes.append(helper.make_node(layer.activation, [current], [f"a{i}"], name=f"act{i}",
                                          **attrs.get(layer.activation, {})))
            current = f"a{i}"
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, spec.dims[0]])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [batch, spec.dims[-1]])],
        inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def param_count(spec: Spec, dims: tuple[int, ...]) -> int:
    return sum(i * o + (o if layer.bias else 0)
               for i, o, layer in zip(dims[:-1], dims[1:], spec.layers, strict=True))


def feeds_for(spec: Spec, seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((spec.batch, spec.dims[0])).astype(np.float32)}


def relative_diff(reference: np.ndarray, output: np.ndarray) -> float:
    ref, out = reference.astype(np.float64), output.astype(np.float64)
    return float(np.max(np.abs(ref - out))) / max(1.0, float(np.max(np.abs(ref))))


# -- reading a pruned model back -------------------------------------------------------------------
@dataclass(frozen=True)
class Found:
    weight: np.ndarray  # as [in, out]
    bias: np.ndarray | None


def read_layers(proto: onnx.ModelProto) -> list[Found]:
    """Weights of each Gemm / MatMul(+Add) in graph order, as [in, out] arrays."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = []
    for node in proto.graph.node:
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            assert attrs.get("transA", 0) == 0
            w = inits[node.input[1]]
            bias = inits[node.input[2]] if len(node.input) > 2 and node.input[2] else None
            found.append(Found(w.T if attrs.get("transB", 0) else w, bias))
        elif node.op_type == "MatMul":
            (add,) = consumers[node.output[0]]
            assert add.op_type == "Add"
            (bias_name,) = [n for n in add.input if n != node.output[0]]
            found.append(Found(inits[node.input[1]], inits[bias_name]))
    return found


def widths_of(proto: onnx.ModelProto) -> tuple[int, ...]:
    """(input, hidden..., output) widths read from the weight shapes, checked for consistency."""
    found = read_layers(proto)
    dims = [found[0].weight.shape[0]]
    for layer in found:
        assert layer.weight.ndim == 2 and layer.weight.shape[0] == dims[-1], "layers do not chain"
        if layer.bias is not None:
            assert layer.bias.shape == (layer.weight.shape[1],)
        dims.append(layer.weight.shape[1])
    return tuple(dims)


def output_shape(proto: onnx.ModelProto) -> list:
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in dims]


def check_model(pruned: Model, spec: Spec, dense: onnx.ModelProto) -> tuple[onnx.ModelProto, np.ndarray]:
    """Property 1 by hand: checker, an ORT run, output shapes as the dense model's."""
    proto = pruned.to_onnx()
    onnx.checker.check_model(proto, full_check=True)
    assert output_shape(proto) == output_shape(dense)
    feeds = feeds_for(spec)
    (before,) = runtime.run(dense, feeds)
    (after,) = runtime.run(proto, feeds)
    assert after.shape == before.shape == (spec.batch, spec.dims[-1])
    assert np.all(np.isfinite(after))
    return proto, after


# -- properties ------------------------------------------------------------------------------------
ratios = st.floats(0.0, 0.9, allow_nan=False)
round_tos = st.sampled_from((1, 2, 4, 8))


@SETTINGS
@given(spec=specs())
def test_inspect_finds_one_prunable_group_per_hidden_layer(spec: Spec) -> None:
    model = Model.from_onnx(build(spec, weight_arrays(spec)))
    deps = graphprune.inspect(model)
    assert [g.units for g in deps.prunable] == list(spec.hidden)
    # input features and outputs are frozen (graph input / output); no other group holds weights
    frozen = [g.units for g in deps.weight_groups if not g.prunable]
    assert sorted(frozen) == sorted([spec.dims[0], spec.dims[-1]])


@SETTINGS
@given(spec=specs(), ratio=ratios, round_to=round_tos)
def test_ratio_prune_verifies_and_hits_the_planned_widths(spec: Spec, ratio: float, round_to: int) -> None:
    dense = build(spec, weight_arrays(spec))
    model = Model.from_onnx(dense)
    report = graphprune.prune(model, ratio=ratio, round_to=round_to)

    # 1. verified, by the report and by hand
    assert report.verified
    proto, _ = check_model(model, spec, dense)

    # 2. each hidden width is kept_count(width, ratio, round_to); input/output untouched
    expected = (spec.dims[0], *(kept_count(w, ratio, round_to) for w in spec.hidden), spec.dims[-1])
    assert widths_of(proto) == expected
    assert [(g["units_before"], g["units_after"]) for g in report.groups if not g["frozen"]] == \
        list(zip(spec.hidden, expected[1:-1], strict=True))
    assert [g.units for g in graphprune.inspect(model).weight_groups if not g.frozen] == list(expected[1:-1])

    # 3. parameter counts, computed from the widths
    assert report.params_before == param_count(spec, spec.dims)
    assert report.params_after == param_count(spec, expected)
    assert model.param_count() == report.params_after
    # the layer kinds survive: Gemm/MatMul and transB as built
    assert [n.op_type for n in proto.graph.node if n.op_type in ("Gemm", "MatMul")] == \
        ["Gemm" if layer.kind == "gemm" else "MatMul" for layer in spec.layers]


@st.composite
def dead_cases(draw: st.DrawFn) -> tuple[Spec, int, tuple[int, ...]]:
    spec = draw(specs())
    layer = draw(st.integers(0, len(spec.hidden) - 1))
    width = spec.hidden[layer]
    dead = draw(st.sets(st.integers(0, width - 1), min_size=1, max_size=width - 1))
    return spec, layer, tuple(sorted(dead))


def zero_units(arrays: list[tuple[np.ndarray, np.ndarray | None]], layer: int, dead: tuple[int, ...]) -> None:
    """Zero hidden units `dead` of hidden layer `layer`: producer column/row, bias, consumer row."""
    w, b = arrays[layer]
    w[:, list(dead)] = 0.0  # [in, out] layout here; build() transposes for transB=1
    if b is not None:
        b[list(dead)] = 0.0
    arrays[layer + 1][0][list(dead), :] = 0.0


@SETTINGS
@given(case=dead_cases())
def test_threshold_zero_removes_exactly_the_dead_units(case: tuple[Spec, int, tuple[int, ...]]) -> None:
    spec, layer, dead = case
    arrays = weight_arrays(spec)
    live_producer = arrays[layer][0].copy()
    zero_units(arrays, layer, dead)
    dense = build(spec, arrays)
    model = Model.from_onnx(dense)
    report = graphprune.prune(model, threshold=0.0)
    assert report.verified
    proto, after = check_model(model, spec, dense)

    # exactly the dead units are gone, from this layer only
    hidden = list(spec.hidden)
    hidden[layer] -= len(dead)
    expected = (spec.dims[0], *hidden, spec.dims[-1])
    assert widths_of(proto) == expected
    live = [u for u in range(spec.hidden[layer]) if u not in dead]
    assert np.array_equal(read_layers(proto)[layer].weight, live_producer[:, live])

    # parameters drop by exactly the dead weights: producer row/column, bias, consumer input column
    fan_in, fan_out = spec.dims[layer], spec.dims[layer + 2]
    dead_params = len(dead) * (fan_in + (1 if spec.layers[layer].bias else 0) + fan_out)
    assert report.params_before == param_count(spec, spec.dims)
    assert report.params_before - report.params_after == dead_params
    assert report.params_after == param_count(spec, expected)

    # lossless: the same outputs as the dense model (with its zero units)
    (before,) = runtime.run(dense, feeds_for(spec))
    assert relative_diff(before, after) <= TOLERANCE
    assert report.max_output_diff is not None and report.max_output_diff <= TOLERANCE


@SETTINGS
@given(spec=specs(), ratio=ratios, round_to=round_tos)
def test_threshold_zero_after_pruning_changes_nothing(spec: Spec, ratio: float, round_to: int) -> None:
    dense = build(spec, weight_arrays(spec))
    model = Model.from_onnx(dense)
    graphprune.prune(model, ratio=ratio, round_to=round_to)
    first = model.to_onnx()
    params, widths = model.param_count(), widths_of(first)

    report = graphprune.prune(model, threshold=0.0)
    assert report.verified
    assert report.params_before == report.params_after == params
    assert not next(p for p in report.passes if p.name == "prune-units").modified
    second = model.to_onnx()
    assert widths_of(second) == widths
    feeds = feeds_for(spec)
    (a,) = runtime.run(first, feeds)
    (b,) = runtime.run(second, feeds)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("round_to", [1, 8])
def test_generator_covers_every_layer_kind(round_to: int) -> None:
    """A fixed example with every layout: Gemm transB 0/1 with and without bias, MatMul + Add."""
    layers_ = (Layer("gemm", 0, True, "Gelu", 0.01, "tanh"), Layer("gemm", 1, False, "LeakyRelu", 0.1, "none"),
               Layer("matmul", 0, True, "HardSwish", 0.01, "none"), Layer("gemm", 1, True, None, 0.01, "none"))
    spec = Spec((5, 17, 9, 24, 3), layers_, True, 3, 11)
    dense = build(spec, weight_arrays(spec))
    model = Model.from_onnx(dense)
    report = graphprune.prune(model, ratio=0.5, round_to=round_to)
    expected = (5, *(kept_count(w, 0.5, round_to) for w in (17, 9, 24)), 3)
    proto, _ = check_model(model, spec, dense)
    assert widths_of(proto) == expected
    assert report.params_after == param_count(spec, expected)
