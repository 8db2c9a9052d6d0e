"""Dependency rules that regroup axes: Flatten and Reshape.

Axes are matched as products of factors. A run of input axes merged into one output axis makes
its first non-1 axis a *coarse* slot whose unit is `block` consecutive output elements (a
channel flattened with its H*W positions); one input axis split into several makes the first
non-1 output axis the coarse one. The other axes of a merge or split are frozen: removing part of
them would not leave whole units. Reshape literal sizes are recomputed by the rewrite.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.rules import Couplings, Dim, Rule, RuleContext, _where, freeze_node


def _couple_runs(node: gs.Node, out: Couplings, x: gs.Tensor, y: gs.Tensor, in_axes: list[int],
                 out_axes: list[int], in_shape: list[Dim], out_shape: list[Dim]) -> None:
    """Couple one matched run: in_axes of x hold the same elements as out_axes of y."""
    ins = [a for a in in_axes if in_shape[a] != 1]
    outs = [a for a in out_axes if out_shape[a] != 1]
    if not ins and not outs:
        return
    if len(ins) == 1 and len(outs) == 1:
        out.couple((x.name, ins[0]), (y.name, outs[0]))
        return
    reason = f"{_where(node)} merges or splits this axis with others"
    if len(outs) == 1 and all(isinstance(in_shape[a], int) for a in ins[1:]):
        out.block((x.name, ins[0]), (y.name, outs[0]), math.prod(in_shape[a] for a in ins[1:]))
        for axis in ins[1:]:
            out.freeze((x.name, axis), reason)
    elif len(ins) == 1 and all(isinstance(out_shape[a], int) for a in outs[1:]):
        out.block((y.name, outs[0]), (x.name, ins[0]), math.prod(out_shape[a] for a in outs[1:]))
        for axis in outs[1:]:
            out.freeze((y.name, axis), reason)
    else:
        for axis in ins:
            out.freeze((x.name, axis), reason)
        for axis in outs:
            out.freeze((y.name, axis), reason)


def match_axes(in_shape: list[Dim], out_shape: list[Dim]) -> list[tuple[list[int], list[int]]] | None:
    """Runs of axes with equal products, left to right; symbolic dims must stand alone on both sides.

    Returns None when the shapes cannot be matched (e.g. a symbolic dim merged with others).
    """
    runs, i, j = [], 0, 0
    while i < len(in_shape) or j < len(out_shape):
        if i == len(in_shape) or j == len(out_shape):
            rest_in, rest_out = list(range(i, len(in_shape))), list(range(j, len(out_shape)))
            if all(in_shape[a] == 1 for a in rest_in) and all(out_shape[a] == 1 for a in rest_out):
                runs.append((rest_in, rest_out))
                return runs
            return None
        a, b = in_shape[i], out_shape[j]
        if not isinstance(a, int) or not isinstance(b, int):
            if isinstance(a, int) and a == 1:
                runs.append(([i], []))
                i += 1
            elif isinstance(b, int) and b == 1:
                runs.append(([], [j]))
                j += 1
            elif not isinstance(a, int) and not isinstance(b, int):
                runs.append(([i], [j]))  # one symbolic dim for one: the same elements
                i, j = i + 1, j + 1
            else:
                return None
            continue
        ins, outs, product_in, product_out = [i], [j], a, b
        i, j = i + 1, j + 1
        while product_in != product_out:
            if product_in < product_out and i < len(in_shape) and isinstance(in_shape[i], int):
                product_in *= in_shape[i]
                ins.append(i)
                i += 1
            elif product_out < product_in and j < len(out_shape) and isinstance(out_shape[j], int):
                product_out *= out_shape[j]
                outs.append(j)
                j += 1
            else:
                return None
        runs.append((ins, outs))
    return runs


def _regroup(node: gs.Node, ctx: RuleContext, out: Couplings, out_shape: list[Dim] | None) -> None:
    x, y = node.inputs[0], node.outputs[0]
    in_shape = ctx.shape(x)
    runs = None if in_shape is None or out_shape is None else match_axes(in_shape, out_shape)
    if runs is None:
        freeze_node(node, ctx, out, f"{_where(node)}: cannot match input and output axes")
        return
    for ins, outs in runs:
        _couple_runs(node, out, x, y, ins, outs, in_shape, out_shape)


def flatten(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    _regroup(node, ctx, out, ctx.shape(node.outputs[0]))


def reshape(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """The target shape must be a constant (its literal sizes are rewritten after pruning)."""
    target = ctx.constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if target is None:
        freeze_node(node, ctx, out, f"{_where(node)}: target shape computed at run time")
        return
    out_shape = ctx.shape(node.outputs[0])
    if out_shape is not None and node.attrs.get("allowzero", 0) == 0:
        # a 0 entry copies the input's dim at that position: the same elements, whatever the name
        in_shape = ctx.shape(node.inputs[0]) or []
        out_shape = [in_shape[i] if int(t) == 0 and i < len(in_shape) else d
                     for i, (t, d) in enumerate(zip(np.asarray(target).reshape(-1), out_shape, strict=False))]
    _regroup(node, ctx, out, out_shape)


SHAPE_RULES: dict[str, Rule] = {
    "Flatten": flatten,
    "Reshape": reshape,
}
