"""Normalizations and softmax: BatchNormalization, LayerNormalization, RMS norms (ONNX's and ONNX
Runtime's SimplifiedLayerNormalization), InstanceNormalization, GroupNormalization, Softmax and
LogSoftmax; ONNX Runtime's fused SkipLayerNormalization / SkipSimplifiedLayerNormalization and
EmbedLayerNormalization."""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from graphprune.ops.base import (
    ELEMENTWISE,
    Couplings,
    F,
    RewriteContext,
    RuleContext,
    broadcast,
    channel_params,
    freeze_node,
    input_rank,
    node_label,
    old_dim,
    optional_tensor,
    present_tensors,
    torch,
)
from graphprune.ops.registry import register


def batch_norm(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Per-channel scale, bias, mean and variance follow axis 1."""
    if not channel_params(node, ctx, out, slice(1, 5)):
        return
    for extra in present_tensors(node.outputs[1:]):  # training mode: running mean and variance
        out.couple((extra.name, 0), (node.outputs[0].name, 1))


def layer_norm(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Normalization over the last axis couples scale/bias with it; removing a unit is not exact."""
    x, y = node.inputs[0], node.outputs[0]
    rank = input_rank(node, ctx, out)
    if rank is None:
        return
    axis = node.attrs.get("axis", -1) % rank
    for a in range(rank):
        out.couple((x.name, a), (y.name, a))
    params = present_tensors(node.inputs[1:3])
    if axis == rank - 1:
        for param in params:
            # scale/bias broadcast against X.shape[axis:]: their last axis is the channel axis
            last = (ctx.rank(param) or 0) - 1
            if last >= 0 and ctx.dim(param, last) == ctx.dim(x, axis):
                out.couple((param.name, last), (y.name, axis))
            elif last >= 0 and ctx.dim(param, last) != 1:
                reason = f"{node_label(node)}: cannot map parameter '{param.name}' to the normalized axis"
                out.freeze((param.name, last), reason)
                out.freeze((y.name, axis), reason)
        out.mark_inexact((y.name, axis), f"{node_label(node)} normalizes over this axis")
        out.produced[(y.name, axis)] = "hidden"  # a normalized feature axis: the residual stream
    else:
        reason = f"{node_label(node)} normalizes over several axes"
        for a in range(axis, rank):
            out.freeze((x.name, a), reason)
        for param in params:
            out.freeze_tensor(param, reason)
    for extra in present_tensors(node.outputs[1:]):
        out.freeze_tensor(extra, f"{node_label(node)}: mean/inv-std outputs")


def softmax(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    x, y = node.inputs[0], node.outputs[0]
    rank = input_rank(node, ctx, out)
    if rank is None:
        return
    normalized: range | list[int]
    if ctx.opset < 13:
        # before opset 13 the input is coerced to 2-D: every axis from `axis` on is normalized
        axis = node.attrs.get("axis", 1) % rank
        normalized = range(axis, rank)
    else:
        normalized = [node.attrs.get("axis", -1) % rank]
    for a in range(rank):
        if a in normalized:
            out.freeze((x.name, a), f"{node_label(node)} normalizes over this axis")
            out.freeze((y.name, a), f"{node_label(node)} normalizes over this axis")
        else:
            out.couple((x.name, a), (y.name, a))


def instance_norm(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Per-channel statistics over spatial axes: channels are independent, removal is exact."""
    channel_params(node, ctx, out, slice(1, 3))


def group_norm(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """GroupNormalization with one channel per group is InstanceNorm; otherwise channels freeze."""
    x, y = node.inputs[0], node.outputs[0]
    groups = node.attrs.get("num_groups")
    if groups is not None and groups == ctx.dim(x, 1):
        channel_params(node, ctx, out, slice(1, 3))
        return
    if not channel_params(node, ctx, out, slice(0, 0)):
        return
    params = present_tensors(node.inputs[1:3])
    reason = f"{node_label(node)}: channels normalized in groups of several"
    out.freeze((y.name, 1), reason)
    for param in params:
        out.freeze_tensor(param, reason)


def rms_norm(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """RMSNormalization: LayerNormalization without the mean and the bias."""
    layer_norm(node, ctx, out)


def skip_layer_norm(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """SkipLayerNormalization / SkipSimplifiedLayerNormalization: LayerNorm(input + skip + bias)
    over the last axis; the sum is an optional 4th output. Input, skip, bias and the sum broadcast
    like an Add; gamma and beta follow the normalized axis; mean and inv_std are frozen."""
    x, y = node.inputs[0], node.outputs[0]
    rank = ctx.rank(x)
    if rank is None:
        freeze_node(node, ctx, out, f"{node_label(node)}: unknown input rank")
        return
    summed = [t for t in (node.inputs[1], optional_tensor(node, 4)) if t is not None and t.name]
    broadcast(node, ctx, out, [x, *summed], y)
    total = optional_tensor(node, 3, True)
    if total is not None:
        for axis in range(rank):
            out.couple((y.name, axis), (total.name, axis))
    hidden = (y.name, rank - 1)
    for param in (node.inputs[2], optional_tensor(node, 3)) if node.op == "SkipLayerNormalization" else (node.inputs[2],):
        if param is not None and param.name:
            out.couple((param.name, (ctx.rank(param) or 1) - 1), hidden)
    out.mark_inexact(hidden, f"{node_label(node)} normalizes over this axis")
    out.produced[hidden] = "hidden"
    for extra in (optional_tensor(node, 1, True), optional_tensor(node, 2, True)):
        if extra is not None:
            out.freeze_tensor(extra, f"{node_label(node)}: mean/inv-std outputs")


def ms_embed_layer_norm(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """com.microsoft EmbedLayerNormalization: LayerNorm(word[ids] + position[pos] + segment[seg]);
    the tables' feature axis, gamma and beta follow the hidden axis; mask_index is frozen."""
    ids, y = node.inputs[0], node.outputs[0]
    total = optional_tensor(node, 2, True)
    for axis in (0, 1):
        out.couple((ids.name, axis), (y.name, axis))
    hidden = (y.name, 2)
    for index in (2, 3, 4):
        table = optional_tensor(node, index)
        if table is not None:
            out.couple((table.name, 1), hidden)
    for index in (5, 6):
        param = optional_tensor(node, index)
        if param is not None:
            out.couple((param.name, 0), hidden)
    if total is not None:
        for axis in range(3):
            out.couple((y.name, axis), (total.name, axis))
    out.mark_inexact(hidden, f"{node_label(node)} normalizes over this axis")
    out.produced[hidden] = "hidden"


def fix_group_norm(node: gs.Node, ctx: RewriteContext) -> None:
    """One group per channel stays so (the rule freezes every other grouping)."""
    x = node.inputs[0]
    kept = ctx.kept_of(x, 1)
    if kept is not None and node.attrs.get("num_groups") == old_dim(x, 1):
        node.attrs["num_groups"] = len(kept)


def _channel_view(v: torch.Tensor, rank: int) -> torch.Tensor:
    return v.reshape([1, -1] + [1] * (rank - 2))


def lower_batch_norm(x, scale, bias, mean, var, epsilon=1e-5, momentum=0.9, training_mode=0, spatial=1):
    rank = x.dim()
    inv = torch.rsqrt(_channel_view(var, rank) + epsilon)
    return (x - _channel_view(mean, rank)) * inv * _channel_view(scale, rank) + _channel_view(bias, rank)


def lower_layer_norm(x, scale, bias=None, axis=-1, epsilon=1e-5, stash_type=1):
    axes = list(range(axis % x.dim(), x.dim()))
    mean = x.mean(dim=axes, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + epsilon) * scale
    return y if bias is None else y + bias


def lower_rms_norm(x, scale, axis=-1, epsilon=1e-5, stash_type=1):
    axes = list(range(axis % x.dim(), x.dim()))
    return x * torch.rsqrt(x.square().mean(dim=axes, keepdim=True) + epsilon) * scale


def lower_instance_norm(x, scale, bias, epsilon=1e-5):
    return F.instance_norm(x, weight=scale, bias=bias, eps=epsilon)


def lower_group_norm(x, scale, bias, num_groups, epsilon=1e-5, stash_type=1):
    n, c = x.shape[0], x.shape[1]
    grouped = x.reshape(n, num_groups, -1)
    mean = grouped.mean(dim=2, keepdim=True)
    var = ((grouped - mean) ** 2).mean(dim=2, keepdim=True)
    y = ((grouped - mean) * torch.rsqrt(var + epsilon)).reshape(x.shape)
    if scale.numel() != c:  # opset 18: one scale per group
        scale, bias = scale.repeat_interleave(c // num_groups), bias.repeat_interleave(c // num_groups)
    return y * _channel_view(scale, x.dim()) + _channel_view(bias, x.dim())


def _coerced(x, axis, opset, fn):
    if opset >= 13:
        return fn(x, dim=axis)
    axis = axis % x.dim()
    flat = x.reshape(math.prod(x.shape[:axis]), -1)
    return fn(flat, dim=1).reshape(x.shape)


def lower_softmax(x, axis=-1, opset=20):
    return _coerced(x, axis if opset >= 13 else (axis if axis is not None else 1), opset, torch.softmax)


def lower_log_softmax(x, axis=-1, opset=20):
    return _coerced(x, axis, opset, torch.log_softmax)


def lower_ms_skip_layer_norm(x, skip, gamma, beta=None, bias=None, epsilon=1e-12, simplified=False):
    """com.microsoft SkipLayerNormalization (and the simplified, RMS one): (norm(x + skip + bias),
    mean, inv_std, x + skip + bias)."""
    total = x + skip if bias is None else x + skip + bias
    mean = total.mean(dim=-1, keepdim=True)
    centred = total if simplified else total - mean
    inv_std = torch.rsqrt(centred.square().mean(dim=-1, keepdim=True) + epsilon)
    y = centred * inv_std * gamma
    return (y if beta is None else y + beta), mean, inv_std, total


def lower_ms_skip_simplified_layer_norm(x, skip, gamma, bias=None, epsilon=1e-12):
    return lower_ms_skip_layer_norm(x, skip, gamma, None, bias, epsilon, simplified=True)


def lower_ms_embed_layer_norm(input_ids, segment_ids, word_embedding, position_embedding, segment_embedding=None,
                        gamma=None, beta=None, mask=None, position_ids=None, epsilon=1e-12, mask_index_type=1):
    """com.microsoft EmbedLayerNormalization: (LayerNorm(word[ids] + position[pos] + segment[seg]),
    mask_index (valid tokens per row), the sum before the norm)."""
    seq = input_ids.shape[1]
    positions = position_ids if position_ids is not None else torch.arange(seq, device=input_ids.device)[None]
    total = word_embedding[input_ids.long()] + position_embedding[positions.long()]
    if segment_embedding is not None and segment_ids is not None:
        total = total + segment_embedding[segment_ids.long()]
    y = F.layer_norm(total, total.shape[-1:], gamma, beta, epsilon)
    mask_index = (mask != 0).sum(dim=1).to(torch.int32) if mask is not None else \
        torch.zeros(input_ids.shape[0], dtype=torch.int32, device=input_ids.device)
    return y, mask_index, total


def _softmax_opset(node: gs.Node, attributes: dict, opset: int) -> None:
    """Before opset 13 Softmax coerces its input to 2-D at `axis` (default 1)."""
    attributes["opset"] = opset
    attributes.setdefault("axis", -1 if opset >= 13 else 1)


register("BatchNormalization", rule=batch_norm, lowering=lower_batch_norm, cost=ELEMENTWISE, unscored_inputs=(3, 4))
register("LayerNormalization", rule=layer_norm, lowering=lower_layer_norm, cost=ELEMENTWISE)
register("RMSNormalization", rule=rms_norm, lowering=lower_rms_norm, cost=ELEMENTWISE)
# ONNX Runtime registers its RMSNorm in the default domain (the onnxruntime-genai builder writes it)
register("SimplifiedLayerNormalization", rule=rms_norm, lowering=lower_rms_norm, cost=ELEMENTWISE)
register("InstanceNormalization", rule=instance_norm, lowering=lower_instance_norm, cost=ELEMENTWISE)
register("GroupNormalization", rule=group_norm, fixup=fix_group_norm, lowering=lower_group_norm, cost=ELEMENTWISE)
register("Softmax", rule=softmax, lowering=lower_softmax, cost=ELEMENTWISE, attributes=_softmax_opset)
register("LogSoftmax", rule=softmax, lowering=lower_log_softmax, cost=ELEMENTWISE, attributes=_softmax_opset)
register("SkipLayerNormalization", "com.microsoft", rule=skip_layer_norm, lowering=lower_ms_skip_layer_norm,
         cost=ELEMENTWISE, multi_output=True)
register("SkipSimplifiedLayerNormalization", "com.microsoft", rule=skip_layer_norm,
         lowering=lower_ms_skip_simplified_layer_norm, cost=ELEMENTWISE, multi_output=True)
register("EmbedLayerNormalization", "com.microsoft", rule=ms_embed_layer_norm, lowering=lower_ms_embed_layer_norm,
         cost=ELEMENTWISE, multi_output=True)
