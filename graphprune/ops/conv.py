"""Convolutional networks: Conv, ConvTranspose, pooling, Pad and Resize."""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.ops.base import (
    ELEMENTWISE,
    Couplings,
    F,
    LoweringError,
    RewriteContext,
    RuleContext,
    freeze_node,
    input_rank,
    int_list,
    is_touched,
    mark_contraction,
    new_sizes,
    node_label,
    numel,
    present_tensors,
    static_dims,
    torch,
)
from graphprune.ops.registry import register

POOL_OPS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")


def conv(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Y[N, Cout, ...] = Conv(X[N, Cin, ...], W[Cout, Cin/group, k...]) + B[Cout].

    group 1: W's output axis produces channels, its input axis consumes X's channels.
    group > 1 (depthwise, ResNeXt): whole groups are the units, each Cin/group input channels and
    Cout/group output channels and filters, so every group keeps the same size (a virtual slot
    holds the group index; the rewrite sets `group` to the groups kept).
    """
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    if input_rank(node, ctx, out, minimum=3) is None or ctx.rank(w) is None or ctx.rank(y) is None:
        return
    group = int(node.attrs.get("group", 1))
    out.couple((x.name, 0), (y.name, 0))
    bias = present_tensors(node.inputs[2:3])
    if group == 1:
        out.couple((x.name, 1), (w.name, 1))
        mark_contraction(node, out, x, w, (x.name, 1))
        out.couple((w.name, 0), (y.name, 1))
        if isinstance(w, gs.Constant):
            out.produced.setdefault((w.name, 0), "channel")
        for b in bias:
            out.couple((b.name, 0), (y.name, 1))
        return
    cin, cout = ctx.dim(x, 1), ctx.dim(y, 1)
    if not isinstance(cin, int) or not isinstance(cout, int) or cin % group or cout % group:
        freeze_node(node, ctx, out, f"{node_label(node)}: grouped convolution with unknown channel counts")
        return
    # a unit is one whole group: cin/group input channels, cout/group output channels and filters
    groups = group_slot(node)
    out.virtual[groups] = group
    out.block(groups, (x.name, 1), cin // group)
    for tensor, axis in ((y, 1), (w, 0), *((b, 0) for b in bias)):
        out.block(groups, (tensor.name, axis), cout // group)


def group_slot(node: gs.Node) -> tuple[str, int]:
    """The virtual slot whose units are the groups of a grouped convolution."""
    return (f"{node.outputs[0].name}#groups", 0)


def conv_transpose(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Y = ConvTranspose(X[N, Cin, ...], W[Cin, Cout/group, k...]) + B[Cout]; group 1 only."""
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    if input_rank(node, ctx, out, minimum=3) is None:
        return
    out.couple((x.name, 0), (y.name, 0))
    if int(node.attrs.get("group", 1)) != 1:
        freeze_node(node, ctx, out, f"{node_label(node)}: grouped transposed convolution")
        return
    out.couple((x.name, 1), (w.name, 0))
    mark_contraction(node, out, x, w, (x.name, 1))
    out.couple((w.name, 1), (y.name, 1))
    if isinstance(w, gs.Constant):
        out.produced.setdefault((w.name, 1), "channel")
    for b in present_tensors(node.inputs[2:3]):
        out.couple((b.name, 0), (y.name, 1))


def pool(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Pooling keeps batch and channel axes; spatial sizes change and are not coupled."""
    x, y = node.inputs[0], node.outputs[0]
    if input_rank(node, ctx, out, minimum=2) is None:
        return
    out.couple((x.name, 0), (y.name, 0))
    indices = present_tensors(node.outputs[1:])
    if indices:  # the index values encode the channel: removing one would renumber the rest
        out.freeze((x.name, 1), f"{node_label(node)}: pooling indices count channels")
        out.freeze((y.name, 1), f"{node_label(node)}: pooling indices count channels")
    else:
        out.couple((x.name, 1), (y.name, 1))
    for extra in indices:
        out.freeze_tensor(extra, f"{node_label(node)}: pooling indices")


def _constant_operand(node: gs.Node, ctx: RuleContext, index: int) -> np.ndarray | None:
    if index < len(node.inputs) and node.inputs[index].name:
        return ctx.constant(node.inputs[index])
    return None


def pad(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Unpadded axes map through; padded ones (spatial, as a rule) are not coupled."""
    x, y = node.inputs[0], node.outputs[0]
    rank = input_rank(node, ctx, out)
    if rank is None:
        return
    pads = node.attrs.get("pads") if ctx.opset < 11 else _constant_operand(node, ctx, 1)
    axes = _constant_operand(node, ctx, 3)
    if pads is None or (len(node.inputs) > 3 and node.inputs[3].name and axes is None):
        freeze_node(node, ctx, out, f"{node_label(node)}: pads computed at run time")
        return
    widths = [int(p) for p in np.asarray(pads).reshape(-1)]
    pad_axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    padded = {axis for i, axis in enumerate(pad_axes) if widths[i] or widths[i + len(pad_axes)]}
    for axis in range(rank):
        if axis in padded:
            out.freeze((x.name, axis), f"{node_label(node)} pads this axis")
        else:
            out.couple((x.name, axis), (y.name, axis))


def resize(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Axes Resize leaves at their size map through (its `sizes` are fixed by the rewrite)."""
    x, y = node.inputs[0], node.outputs[0]
    rank = input_rank(node, ctx, out)
    if rank is None or ctx.rank(y) != rank:
        return
    given = [i for i in (2, 3) if i < len(node.inputs) and node.inputs[i].name]
    if any(ctx.constant(node.inputs[i]) is None for i in given):
        freeze_node(node, ctx, out, f"{node_label(node)}: scales/sizes computed at run time")
        return
    if node.attrs.get("axes") is not None:
        freeze_node(node, ctx, out, f"{node_label(node)}: resizes a subset of axes (the `axes` attribute)")
        return
    scales = ctx.constant(node.inputs[2]) if 2 in given else None
    sizes = ctx.constant(node.inputs[3]) if 3 in given else None
    for axis in range(rank):
        dim = ctx.dim(x, axis)
        # an axis maps through only when Resize leaves it alone (scale 1, or its own size)
        unchanged = (scales is not None and scales.size == rank and float(scales.reshape(-1)[axis]) == 1.0) or (
            sizes is not None and sizes.size == rank and isinstance(dim, int) and int(sizes.reshape(-1)[axis]) == dim)
        if unchanged:
            out.couple((x.name, axis), (y.name, axis))
        else:
            out.freeze((x.name, axis), f"{node_label(node)} resizes this axis")


def fix_conv(node: gs.Node, ctx: RewriteContext) -> None:
    """A grouped convolution keeps as many groups as its group slot kept."""
    kept = ctx.kept.get(group_slot(node))
    if kept is not None:
        node.attrs["group"] = len(kept)


def fix_resize(node: gs.Node, ctx: RewriteContext) -> None:
    """A Resize given output `sizes` gets the new channel count."""
    y = node.outputs[0]
    if len(node.inputs) > 3 and node.inputs[3].name and is_touched(y, ctx):
        node.inputs[3] = ctx.constant(f"{node.name}_sizes", np.array(new_sizes(y, ctx), dtype=np.int64))


def _conv_macs(node: gs.Node) -> int:
    w = static_dims(node.inputs[1])
    if w is None:
        return 0
    # weight is [C_out, C_in / group, *kernel]: each output element reads C_in/group * kernel inputs
    return numel(node.outputs[0]) * int(np.prod(w[1:], dtype=np.int64))


def _qlinear_conv_macs(node: gs.Node) -> int:
    w = static_dims(node.inputs[3])  # x, x_scale, x_zero_point, w, ...
    return 0 if w is None else numel(node.outputs[0]) * int(np.prod(w[1:], dtype=np.int64))


def _conv_transpose_macs(node: gs.Node) -> int:
    w = static_dims(node.inputs[1])
    if w is None:
        return 0
    # weight is [C_in, C_out / group, *kernel]: each input element writes C_out/group * kernel outputs
    return numel(node.inputs[0]) * int(np.prod(w[1:], dtype=np.int64))


def _pads(x, kernel, strides, dilations, pads, auto_pad):
    spatial = x.dim() - 2
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads_begin, pads_end = [], []
        for i in range(spatial):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
            small, big = total // 2, total - total // 2
            pads_begin.append(small if auto_pad == "SAME_UPPER" else big)
            pads_end.append(big if auto_pad == "SAME_UPPER" else small)
        return pads_begin + pads_end
    return list(pads) if pads else [0] * (2 * spatial)


def _padded(x, pads, value=0.0):
    """Symmetric pads as a torch `padding`; asymmetric ones applied with F.pad first."""
    half = len(pads) // 2
    begin, end = pads[:half], pads[half:]
    if begin == end:
        return x, begin
    flat = [p for b, e in zip(reversed(begin), reversed(end), strict=True) for p in (b, e)]
    return F.pad(x, flat, value=value), [0] * half


def lower_conv(x, w, b=None, group=1, pads=None, strides=None, dilations=None, auto_pad="NOTSET", kernel_shape=None):
    spatial = x.dim() - 2
    strides = strides or [1] * spatial
    dilations = dilations or [1] * spatial
    x, padding = _padded(x, _pads(x, list(w.shape[2:]), strides, dilations, pads, auto_pad))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return conv(x, w, b, strides, padding, dilations, group)


def lower_conv_transpose(x, w, b=None, group=1, pads=None, strides=None, dilations=None, output_padding=None,
                        auto_pad="NOTSET", kernel_shape=None, output_shape=None):
    spatial = x.dim() - 2
    if output_shape is not None or auto_pad != "NOTSET":
        raise LoweringError("ConvTranspose with output_shape or auto_pad is not supported")
    pads = pads or [0] * (2 * spatial)
    if pads[:spatial] != pads[spatial:]:
        raise LoweringError("ConvTranspose with asymmetric pads is not supported")
    conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[spatial]
    return conv(x, w, b, strides or [1] * spatial, pads[:spatial], output_padding or [0] * spatial, group,
                dilations or [1] * spatial)


def lower_max_pool(x, kernel_shape, pads=None, strides=None, dilations=None, ceil_mode=0, auto_pad="NOTSET",
                  storage_order=0):
    """Returns (values, indices); ONNX indices count over the whole input tensor, row-major."""
    spatial = x.dim() - 2
    strides = strides or [1] * spatial
    dilations = dilations or [1] * spatial
    padded, padding = _padded(x, _pads(x, kernel_shape, strides, dilations, pads, auto_pad), float("-inf"))
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
    values, indices = pool(padded, kernel_shape, strides, padding, dilations, ceil_mode=bool(ceil_mode),
                           return_indices=True)
    if padded.shape == x.shape and not storage_order:
        plane = math.prod(x.shape[2:])
        offsets = torch.arange(x.shape[0] * x.shape[1]).reshape(x.shape[0], x.shape[1], *[1] * spatial) * plane
        indices = indices + offsets
    else:
        indices = None  # asymmetric pads or column-major indices: only the values are lowered
    return values, indices


def lower_avg_pool(x, kernel_shape, pads=None, strides=None, ceil_mode=0, count_include_pad=0, auto_pad="NOTSET",
                  dilations=None):
    spatial = x.dim() - 2
    strides = strides or [1] * spatial
    pads = _pads(x, kernel_shape, strides, [1] * spatial, pads, auto_pad)
    if pads[:spatial] != pads[spatial:]:
        if count_include_pad:
            x, pads = F.pad(x, [p for i in reversed(range(spatial)) for p in (pads[i], pads[spatial + i])]), \
                [0] * 2 * spatial
        else:
            raise LoweringError("AveragePool with asymmetric pads excluding padding is not supported")
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
    return pool(x, kernel_shape, strides, pads[:spatial], ceil_mode=bool(ceil_mode),
                count_include_pad=bool(count_include_pad))


def lower_global_avg_pool(x):
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def lower_global_max_pool(x):
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


def lower_lp_pool(x, kernel_shape, p=2, pads=None, strides=None, ceil_mode=0, auto_pad="NOTSET", dilations=None):
    spatial = x.dim() - 2
    strides = strides or [1] * spatial
    x, padding = _padded(x, _pads(x, kernel_shape, strides, [1] * spatial, pads, auto_pad))
    x = F.pad(x, [q for v in reversed(padding) for q in (v, v)]) if any(padding) else x
    pool = {1: F.lp_pool1d, 2: F.lp_pool2d, 3: F.lp_pool3d}[spatial]
    return pool(x, float(p), kernel_shape, strides, ceil_mode=bool(ceil_mode))


def lower_global_lp_pool(x, p=2):
    return x.abs().pow(p).sum(dim=tuple(range(2, x.dim())), keepdim=True).pow(1.0 / p)


def lower_pad(x, pads, value=None, axes=None, mode="constant"):
    pads = int_list(pads)
    rank = x.dim()
    axes = int_list(axes) if axes is not None else list(range(rank))
    half = len(pads) // 2
    full = [0] * (2 * rank)
    for i, axis in enumerate(axes):
        full[axis % rank], full[rank + axis % rank] = pads[i], pads[half + i]
    flat = [p for i in reversed(range(rank)) for p in (full[i], full[rank + i])]
    while len(flat) > 2 and flat[-2:] == [0, 0]:
        flat = flat[:-2]
    if mode == "constant":
        return F.pad(x, flat, value=float(value.item()) if value is not None and value.numel() else 0.0)
    return F.pad(x, flat, mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode])


def _resize_nearest(x, size, factor, transform: str, nearest: str):
    """ONNX nearest-neighbour Resize, axis by axis: source index from the coordinate transform,
    rounded as `nearest_mode` says, clamped into the input."""
    for axis in range(x.dim()):
        length = x.shape[axis]
        out = size[axis] if size is not None else int(math.floor(length * factor[axis]))
        scale = out / length if size is not None else factor[axis]
        if out == length and scale == 1:
            continue
        o = torch.arange(out, dtype=torch.float64)
        if transform == "asymmetric":
            src = o / scale
        elif transform == "align_corners":
            src = o * (length - 1) / (out - 1) if out > 1 else torch.zeros_like(o)
        elif transform == "tf_half_pixel_for_nn":
            src = (o + 0.5) / scale
        elif transform in ("half_pixel", "pytorch_half_pixel"):
            src = (o + 0.5) / scale - 0.5 if out > 1 or transform == "half_pixel" else torch.zeros_like(o)
        else:
            raise LoweringError(f"Resize nearest with {transform} is not supported")
        rounding = {"round_prefer_floor": lambda v: torch.ceil(v - 0.5), "round_prefer_ceil": lambda v: torch.floor(v + 0.5),
                    "floor": torch.floor, "ceil": torch.ceil}[nearest]
        index = rounding(src).clamp(0, length - 1).long()
        x = torch.index_select(x, axis, index)
    return x


def lower_resize(x, roi=None, scales=None, sizes=None, mode="nearest", coordinate_transformation_mode="half_pixel",
                nearest_mode="round_prefer_floor", cubic_coeff_a=-0.75, exclude_outside=0, extrapolation_value=0.0,
                antialias=0, axes=None, keep_aspect_ratio_policy="stretch"):
    rank = x.dim()
    chosen = [a % rank for a in axes] if axes else list(range(rank))
    if sizes is not None and sizes.numel():
        size, factor = list(x.shape), None
        for axis, value in zip(chosen, int_list(sizes), strict=True):
            size[axis] = value
    else:
        size, factor = None, [1.0] * rank
        for axis, value in zip(chosen, scales.reshape(-1).tolist(), strict=True):
            factor[axis] = float(value)
    if mode == "nearest":
        return _resize_nearest(x, size, factor, coordinate_transformation_mode, nearest_mode)
    if (size is not None and list(size[:2]) != list(x.shape[:2])) or (factor is not None and factor[:2] != [1, 1]):
        raise LoweringError(f"Resize {mode} of the batch or channel axis is not supported")
    size, factor = (size[2:] if size is not None else None), (factor[2:] if factor is not None else None)
    torch_mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.dim() - 2] if mode == "linear" else "bicubic"
    align = coordinate_transformation_mode == "align_corners"
    if coordinate_transformation_mode not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        raise LoweringError(f"Resize {mode} with {coordinate_transformation_mode} is not supported")
    return F.interpolate(x, size=size, scale_factor=factor, mode=torch_mode, align_corners=align)


register("Conv", rule=conv, fixup=fix_conv, lowering=lower_conv, cost=_conv_macs, tags={"weighted", "calibrated"})
# INT8 forms from ONNX Runtime's quantizer: counted, never pruned through (no rule: they freeze)
register("ConvInteger", cost=_conv_macs)
register("QLinearConv", cost=_qlinear_conv_macs)
register("ConvTranspose", rule=conv_transpose, lowering=lower_conv_transpose, cost=_conv_transpose_macs,
         tags={"weighted"})
for _op, _lowering in {"MaxPool": lower_max_pool, "AveragePool": lower_avg_pool, "LpPool": lower_lp_pool,
                       "GlobalAveragePool": lower_global_avg_pool, "GlobalMaxPool": lower_global_max_pool,
                       "GlobalLpPool": lower_global_lp_pool}.items():
    register(_op, rule=pool, lowering=_lowering, cost=ELEMENTWISE, multi_output=_op == "MaxPool", tags={"pool"})
register("Pad", rule=pad, lowering=lower_pad, cost=ELEMENTWISE)
register("Resize", rule=resize, fixup=fix_resize, lowering=lower_resize, cost=ELEMENTWISE)
