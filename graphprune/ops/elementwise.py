"""Elementwise ops: activations, unary math, predicates and logic, casts, and the binary and
variadic ops that broadcast like numpy; with ONNX Runtime's fused bias activations (BiasGelu,
FastGelu, QuickGelu) and Trilu (a mask maker)."""

from __future__ import annotations

import operator
from collections.abc import Callable

import onnx_graphsurgeon as gs

from graphprune.ops.base import (
    ELEMENTWISE,
    FREE,
    Couplings,
    F,
    RuleContext,
    broadcast,
    present_tensors,
    torch,
    torch_dtype,
)
from graphprune.ops.registry import register


def elementwise(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Unary, binary and variadic elementwise ops with numpy broadcasting."""
    for output in present_tensors(node.outputs):
        broadcast(node, ctx, out, present_tensors(node.inputs), output)


def bias_activation(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """BiasGelu / FastGelu / Gelu / QuickGelu: an activation of input + bias (elementwise)."""
    for output in node.outputs[:1]:
        broadcast(node, ctx, out, [t for t in node.inputs if t is not None and t.name], output)


# -- lowerings -----------------------------------------------------------------------------------
def _unary(name: str, functional: bool = False) -> Callable:
    """The lowering of a one-input op: `torch.<name>` (`torch.nn.functional.<name>`)."""
    def lowered(x, **_):
        return getattr(F if functional else torch, name)(x)
    lowered.__name__ = f"lower_{name}"
    return lowered


def _binary(name: str) -> Callable:
    """The lowering of a two-input op: `operator.<name>` for arithmetic, else `torch.<name>`."""
    def lowered(a, b):
        return getattr(operator if name in ("add", "sub", "mul") else torch, name)(a, b)
    lowered.__name__ = f"lower_{name}"
    return lowered


def lower_div(a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def lower_pow(a, b):
    return torch.pow(a, b).to(a.dtype)


def lower_variadic(*xs, op: str):
    if op == "Mean":
        return lower_variadic(*xs, op="Sum") / len(xs)
    fn = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add}[op]
    out = xs[0]
    for x in xs[1:]:
        out = fn(out, x)
    return out


def lower_clip(x, lo=None, hi=None, min=None, max=None):  # noqa: A002  (opset < 11 attributes)
    lo = lo if lo is not None else min
    hi = hi if hi is not None else max
    return torch.clamp(x, lo, hi)


def lower_gelu(x, approximate="none"):
    return F.gelu(x, approximate=approximate)


def lower_leaky_relu(x, alpha=0.01):
    return F.leaky_relu(x, alpha)


def lower_elu(x, alpha=1.0):
    return F.elu(x, alpha)


def lower_celu(x, alpha=1.0):
    return F.celu(x, alpha)


def lower_selu(x, alpha=1.67326319217681884765625, gamma=1.05070102214813232421875):
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


def lower_hard_sigmoid(x, alpha=0.2, beta=0.5):
    return torch.clamp(alpha * x + beta, 0, 1)


def lower_thresholded_relu(x, alpha=1.0):
    return torch.where(x > alpha, x, torch.zeros_like(x))


def lower_prelu(x, slope):
    return torch.where(x >= 0, x, x * slope)


def lower_is_inf(x, detect_negative=1, detect_positive=1):
    return (torch.isinf(x) & (x > 0) & bool(detect_positive)) | (torch.isinf(x) & (x < 0) & bool(detect_negative))


def lower_cast(x, to):
    return x.to(torch_dtype(to))


def lower_cast_like(x, like, **_):
    return x.to(like.dtype)


def lower_where(c, a, b):
    return torch.where(c, a, b)


def lower_identity(x, *_, **__):
    return x


def lower_trilu(x, k=None, upper=1):
    diagonal = int(k.item()) if k is not None else 0
    return torch.triu(x, diagonal) if upper else torch.tril(x, diagonal)


def lower_ms_bias_gelu(x, bias=None, approximate="none"):
    return F.gelu(x if bias is None else x + bias, approximate=approximate)


def lower_ms_fast_gelu(x, bias=None):
    return lower_ms_bias_gelu(x, bias, approximate="tanh")


def lower_ms_quick_gelu(x, alpha=1.702):
    return x * torch.sigmoid(alpha * x)


# -- registrations --------------------------------------------------------------------------------
UNARY = {
    "Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Exp": "exp", "Log": "log", "Sqrt": "sqrt",
    "Reciprocal": "reciprocal", "Neg": "neg", "Abs": "abs", "Sin": "sin", "Cos": "cos", "Floor": "floor",
    "Ceil": "ceil", "Round": "round", "Sign": "sign", "Erf": "erf", "Not": "logical_not", "IsNaN": "isnan",
}
FUNCTIONAL = {"Softplus": "softplus", "Softsign": "softsign", "Mish": "mish", "HardSwish": "hardswish"}
BINARY = {
    "Add": "add", "Sub": "sub", "Mul": "mul", "Equal": "eq", "Less": "lt", "LessOrEqual": "le", "Greater": "gt",
    "GreaterOrEqual": "ge", "And": "logical_and", "Or": "logical_or", "Xor": "logical_xor",
}
LOWERINGS = {
    **{op: _unary(name) for op, name in UNARY.items()},
    **{op: _unary(name, functional=True) for op, name in FUNCTIONAL.items()},
    **{op: _binary(name) for op, name in BINARY.items()},
    "Div": lower_div, "Pow": lower_pow, "Clip": lower_clip, "Gelu": lower_gelu, "LeakyRelu": lower_leaky_relu,
    "Elu": lower_elu, "Celu": lower_celu, "Selu": lower_selu, "HardSigmoid": lower_hard_sigmoid,
    "ThresholdedRelu": lower_thresholded_relu, "PRelu": lower_prelu, "IsInf": lower_is_inf, "Cast": lower_cast,
    "CastLike": lower_cast_like, "Where": lower_where, "Identity": lower_identity, "Dropout": lower_identity,
    "Max": lower_variadic, "Min": lower_variadic, "Sum": lower_variadic, "Mean": lower_variadic,
}


def _variadic_op(node: gs.Node, attributes: dict, opset: int) -> None:
    attributes["op"] = node.op


#: ops that only move data: a cast or an identity costs nothing
_FREE = ("Identity", "Dropout", "Cast")
for _op, _lowering in LOWERINGS.items():
    register(_op, rule=elementwise, lowering=_lowering, cost=FREE if _op in _FREE else ELEMENTWISE,
             attributes=_variadic_op if _op in ("Max", "Min", "Sum", "Mean") else None,
             unscored_inputs=(1,) if _op == "Div" else (), tags={"elementwise"})
register("Trilu", lowering=lower_trilu, cost=ELEMENTWISE)
for _op, _lowering in {"BiasGelu": lower_ms_bias_gelu, "FastGelu": lower_ms_fast_gelu, "Gelu": lower_ms_bias_gelu,
                       "QuickGelu": lower_ms_quick_gelu}.items():
    register(_op, "com.microsoft", rule=bias_activation, lowering=_lowering, cost=ELEMENTWISE)
