"""Lowering: an ONNX graph as a torch.fx GraphModule whose float initializers are nn.Parameters.

This gives gradients for any supported ONNX model, not only for ones exported from our own torch
code: Taylor scores, reconstruction and distillation all run on the lowered module, and
`write_back` copies trained parameters into the ONNX initializers again.

Each op's lowering is registered with the op (`graphprune.ops`): a module-level function of
(inputs..., **attributes) that follows the ONNX definition with torch ops. Attributes are plain
Python values, so the fx graph prints and recompiles like any other. An op without a lowering
raises `LoweringError` naming it.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from torch import fx, nn

from graphprune.ir.model import Model
from graphprune.ir.weights import replacement
from graphprune.ops import spec_of
from graphprune.ops.base import LoweringError
from graphprune.ops.registry import OpSpec

__all__ = ["LoweringError", "lower", "parameter_names", "write_back"]


def _attributes(node: gs.Node, spec: OpSpec, opset: int) -> dict:
    """ONNX attributes as plain keyword values for the lowering function."""
    attrs = {}
    for key, value in node.attrs.items():
        if isinstance(value, gs.Constant | np.ndarray):
            value = np.asarray(getattr(value, "values", value)).tolist()
        elif isinstance(value, gs.Graph):
            raise LoweringError(f"{node.op} node '{node.name}' holds a subgraph: control flow is not supported")
        elif isinstance(value, bytes):
            value = value.decode()
        elif key == "to" and not isinstance(value, int):  # Cast's target type given as a numpy dtype
            value = int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(value)))
        attrs[key] = value
    if spec.attributes is not None:
        spec.attributes(node, attrs, opset)
    return attrs


def lower(model: Model) -> fx.GraphModule:
    """The model as an fx GraphModule: float initializers are Parameters (by sanitized name, see
    `parameter_names`), other constants are buffers; inputs and outputs keep the graph's order.

    Scalars (epsilons, attention scales) and Pow exponents are constants of the computation, not
    weights: buffers. Trained, an exponent's gradient (x^y log x) is NaN for any negative x.
    """
    root = nn.Module()
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    names: dict[str, str] = {}
    exponents = {id(node.inputs[1]) for node in model.graph.nodes if node.op == "Pow" and len(node.inputs) > 1}
    for index, const in enumerate(model.constants().values()):
        attr = f"c{index}"
        names[const.name] = attr
        array = torch.from_numpy(np.array(const.values))
        if array.is_floating_point() and array.ndim > 0 and id(const) not in exponents:
            root.register_parameter(attr, nn.Parameter(array))
        else:
            root.register_buffer(attr, array)
    for tensor in model.graph.inputs:
        if tensor.name not in names:
            env[tensor.name] = graph.placeholder(_identifier(tensor.name))
    opset = model.graph.opset
    for node in model.graph.nodes:
        spec = spec_of(node)
        if spec is None or spec.lowering is None:
            note = f" ({spec.note})" if spec is not None and spec.note else ""
            raise LoweringError(f"cannot lower {node.op} (node '{node.name or '(unnamed)'}'): no lowering rule{note}")
        fn = spec.lowering
        args: list[Any] = []
        kwargs = _attributes(node, spec, opset)
        keywords = spec.keyword_inputs
        for i, tensor in enumerate(node.inputs):
            if tensor is None or not tensor.name:
                value = None
            elif tensor.name in names:
                value = env.get(tensor.name) or env.setdefault(tensor.name, graph.get_attr(names[tensor.name]))
            else:
                value = env[tensor.name]
            if i in keywords:
                kwargs[keywords[i]] = value
            else:
                args.append(value)
        while args and args[-1] is None:
            args.pop()
        result = graph.call_function(fn, tuple(args), kwargs)
        if spec.multi_output:
            for i, tensor in enumerate(node.outputs):
                if tensor.name:
                    env[tensor.name] = graph.call_function(operator.getitem, (result, i))
        else:
            env[node.outputs[0].name] = result  # Dropout's mask and similar extra outputs are not lowered
    results = [env[t.name] if t.name in env else graph.get_attr(names[t.name]) for t in model.graph.outputs]
    graph.output(results[0] if len(results) == 1 else tuple(results))
    module = fx.GraphModule(root, graph)
    # attribute -> initializer name (a plain attribute; nn.Module's typing only knows tensors and modules)
    module.onnx_names = {v: k for k, v in names.items()}  # type: ignore[assignment]
    return module


def _identifier(name: str) -> str:
    cleaned = "".join(c if c.isalnum() else "_" for c in name)
    return cleaned if cleaned and not cleaned[0].isdigit() else f"input_{cleaned}"


def parameter_names(module: fx.GraphModule) -> dict[str, str]:
    """Parameter attribute -> ONNX initializer name."""
    onnx_names: dict[str, str] = vars(module)["onnx_names"]
    return {attr: name for attr, name in onnx_names.items()
            if isinstance(getattr(module, attr, None), nn.Parameter)}


def write_back(model: Model, module: fx.GraphModule) -> int:
    """Copy the module's parameters into the model's initializers; returns how many changed."""
    consts = model.constants()
    changed = 0
    for attr, name in parameter_names(module).items():
        values = getattr(module, attr).detach().cpu().numpy()
        old = np.asarray(consts[name].values)
        if values.shape != old.shape:
            raise LoweringError(f"parameter for '{name}' has shape {values.shape}, the initializer {old.shape}")
        if not np.array_equal(values, old):
            consts[name].values = replacement(old, values.astype(old.dtype))
            changed += 1
    return changed
