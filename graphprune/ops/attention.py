"""Attention: the ONNX ops of opset 23 (Attention, RotaryEmbedding: what `torch.onnx.export(...,
opset_version=23)` emits for SDPA and rotary embeddings) and the com.microsoft attention ops ONNX
Runtime's transformer optimizer and the onnxruntime-genai builder write (Attention,
MultiHeadAttention, GroupQueryAttention).

Attention takes Q, K, V either as [batch, heads, seq, head_dim] or as [batch, seq, heads *
head_dim] with `q_num_heads` / `kv_num_heads` attributes. Query heads and the output's heads are
one axis; with grouped-query attention (more query than KV heads) a KV head carries its
`q_heads / kv_heads` consecutive query heads, as in the Unsqueeze -> Expand -> Reshape pattern.
In the 3-D form the heads are virtual slots factored out of the hidden axes, and the rewrite sets
the head-count attributes to the heads kept (`head_slots`).
"""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from graphprune.ops.base import (
    ELEMENTWISE,
    Couplings,
    LoweringError,
    RewriteContext,
    RuleContext,
    Slot,
    all_static,
    freeze_node,
    node_label,
    numel,
    optional_tensor,
    torch,
)
from graphprune.ops.registry import register


def head_slots(node: gs.Node) -> tuple[Slot, Slot]:
    """The virtual slots of an Attention node's query heads and KV heads (3-D inputs)."""
    return (f"{node.outputs[0].name}#q_heads", 0), (f"{node.outputs[0].name}#kv_heads", 0)


def _heads(out: Couplings, ctx: RuleContext, node: gs.Node, q_heads: Slot, kv_heads: Slot, q_count: object,
           kv_count: object) -> bool:
    """Query heads follow KV heads: index for index, or `rep` consecutive ones per KV head (GQA);
    with query-head GQA pruning the `rep` query heads of each KV head are the units instead."""
    if q_count == kv_count:
        out.couple(kv_heads, q_heads)
    elif isinstance(q_count, int) and isinstance(kv_count, int) and kv_count and q_count % kv_count == 0:
        if ctx.gqa == "query":
            shared = (f"{node.outputs[0].name}#query_per_kv_head", 0)
            out.virtual[shared] = q_count // kv_count
            out.repeated.add(shared)
            out.factor(q_heads, [kv_heads, shared], [kv_count, q_count // kv_count],
                       f"{node_label(node)}: query-head pruning keeps every KV head")
        else:
            out.block(kv_heads, q_heads, q_count // kv_count)
    else:
        reason = f"{node_label(node)}: {q_count} query heads cannot share {kv_count} KV heads"
        out.freeze(q_heads, reason)
        out.freeze(kv_heads, reason)
        return False
    out.produced[q_heads] = "head"
    return True


def attention(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Y = softmax(Q K^T * scale + mask) V, per head; optional past/present KV and the QK output."""
    q, k, v = node.inputs[:3]
    y = node.outputs[0]
    mask = optional_tensor(node, 3)
    past = [t for t in (optional_tensor(node, 4), optional_tensor(node, 5))]
    present = [optional_tensor(node, 1, True), optional_tensor(node, 2, True)]
    qk_output = optional_tensor(node, 3, True)
    rank = ctx.rank(q)
    if rank not in (3, 4) or ctx.rank(k) != rank or ctx.rank(v) != rank or ctx.rank(y) != rank:
        freeze_node(node, ctx, out, f"{node_label(node)}: unknown or unsupported input ranks")
        return
    batch = (q.name, 0)
    for tensor in (k, v, y, *(t for t in past + present + [qk_output] if t is not None)):
        out.couple(batch, (tensor.name, 0))
    if rank == 4:
        q_heads, kv_heads = (q.name, 1), (k.name, 1)
        q_count, kv_count = ctx.dim(q, 1), ctx.dim(k, 1)
        q_dim, v_dim = (q.name, 3), (v.name, 3)
        out.couple(q_dim, (k.name, 3))
        out.couple(v_dim, (y.name, 3))
        out.couple((q.name, 2), (y.name, 2))
        out.couple((k.name, 2), (v.name, 2))
        out.couple(q_heads, (y.name, 1))
        out.couple(kv_heads, (v.name, 1))
        scores = q_heads
    else:
        q_count, kv_count = node.attrs.get("q_num_heads"), node.attrs.get("kv_num_heads")
        sizes = all_static([ctx.dim(t, 2) for t in (q, k, v, y)])
        if not isinstance(q_count, int) or not isinstance(kv_count, int) or sizes is None \
                or sizes[0] % q_count or sizes[1] % kv_count or sizes[2] % kv_count or sizes[3] % q_count:
            freeze_node(node, ctx, out, f"{node_label(node)}: head counts do not divide the hidden sizes")
            return
        q_heads, kv_heads = head_slots(node)
        q_dim, v_dim = (f"{y.name}#head_dim", 0), (f"{y.name}#v_head_dim", 0)
        out.virtual.update({q_heads: q_count, kv_heads: kv_count, q_dim: sizes[0] // q_count,
                            v_dim: sizes[2] // kv_count})
        reason = f"{node_label(node)} splits this axis into heads"
        out.factor((q.name, 2), [q_heads, q_dim], [q_count, sizes[0] // q_count], reason)
        out.factor((k.name, 2), [kv_heads, q_dim], [kv_count, sizes[1] // kv_count], reason)
        out.factor((v.name, 2), [kv_heads, v_dim], [kv_count, sizes[2] // kv_count], reason)
        out.factor((y.name, 2), [q_heads, v_dim], [q_count, sizes[3] // q_count], reason)
        out.couple((q.name, 1), (y.name, 1))
        out.couple((k.name, 1), (v.name, 1))
        scores = q_heads
    out.mark_inexact(q_dim, f"{node_label(node)} contracts this axis between two activations")
    _heads(out, ctx, node, q_heads, kv_heads, q_count, kv_count)
    # the cache: [batch, kv_heads, seq, head_dim]; its sequence grows by the new tokens
    for cache, dim in zip(past, (q_dim, v_dim), strict=True):
        if cache is not None:
            out.couple(kv_heads, (cache.name, 1))
            out.couple(dim, (cache.name, 3))
    for cache, dim in zip(present, (q_dim, v_dim), strict=True):
        if cache is not None:
            out.couple(kv_heads, (cache.name, 1))
            out.couple(dim, (cache.name, 3))
    if qk_output is not None:
        out.couple(scores, (qk_output.name, 1))
        out.couple((q.name, 1 if rank == 3 else 2), (qk_output.name, 2))
    if mask is not None:
        # broadcast against [batch, q_heads, q_seq, total_kv_seq]: only the heads axis is coupled
        mask_rank = ctx.rank(mask) or 0
        if mask_rank >= 3 and ctx.dim(mask, mask_rank - 3) not in (1,):
            if ctx.dim(mask, mask_rank - 3) == q_count:
                out.couple(scores, (mask.name, mask_rank - 3))
            else:
                out.freeze((mask.name, mask_rank - 3), f"{node_label(node)}: cannot tell how the mask broadcasts")


def rotary_embedding(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Rotates pairs of head_dim features of every head: X and Y are the same slots; the rotated
    axis and the cos/sin caches stay as they are. 3-D input: heads are factored out of the hidden
    axis with `num_heads`, which the rewrite updates."""
    x, y = node.inputs[0], node.outputs[0]
    rank = ctx.rank(x)
    if rank not in (3, 4):
        freeze_node(node, ctx, out, f"{node_label(node)}: unknown input rank")
        return
    for axis in range(rank):
        out.couple((x.name, axis), (y.name, axis))
    reason = f"{node_label(node)} rotates this axis"
    if rank == 4:
        out.freeze((x.name, 3), reason)
        return
    heads = node.attrs.get("num_heads")
    size = ctx.dim(x, 2)
    if not isinstance(heads, int) or not isinstance(size, int) or size % heads:
        out.freeze((x.name, 2), f"{node_label(node)}: num_heads does not divide the hidden size")
        return
    head_slot, dim_slot = (f"{y.name}#heads", 0), (f"{y.name}#head_dim", 0)
    out.virtual.update({head_slot: heads, dim_slot: size // heads})
    out.factor((x.name, 2), [head_slot, dim_slot], [heads, size // heads], reason)
    out.freeze(dim_slot, reason)
    out.produced[head_slot] = "head"


def fused_head_slots(node: gs.Node) -> tuple[Slot, Slot]:
    """The virtual slots of a com.microsoft attention node's query heads and KV heads (for
    Attention and MultiHeadAttention, one and the same count)."""
    return (f"{node.outputs[0].name}#heads", 0), (f"{node.outputs[0].name}#kv_heads", 0)


def _packed(out: Couplings, whole: Slot, parts: list[tuple[Slot, int]]) -> None:
    """An axis that holds `parts` end to end: packed Q | K | V projections or biases."""
    start = 0
    for slot, size in parts:
        out.virtual[slot] = size
        out.offset(slot, whole, start)
        start += size


def _split_heads(out: Couplings, reason: str, hidden: dict[Slot, tuple[Slot, Slot, int, int]]) -> None:
    """Each hidden slot is [heads, head_dim]: `hidden` maps slot -> (heads, dim, count, size)."""
    for slot, (heads, dim, count, size) in hidden.items():
        out.virtual.setdefault(heads, count)
        out.virtual.setdefault(dim, size)
        out.factor(slot, [heads, dim], [count, size], reason)


def _fused_attention(node: gs.Node, ctx: RuleContext, out: Couplings, hidden: dict[str, Slot],
                     q_count: object, kv_count: object, caches: list[tuple[gs.Tensor | None, int, str]],
                     bias: gs.Tensor | None = None) -> None:
    """What the com.microsoft attention ops share. `hidden` gives the slots of the q/k/v/output
    hidden axes (packed ones are virtual); they are split into heads of `q_count` / `kv_count`.
    `caches` are (tensor, heads axis, "k" or "v"): [batch, kv_heads, seq, head_dim] tensors
    (Attention's past is [2, batch, heads, seq, head_dim]); `bias` [batch|1, heads|1, q, kv] is
    added to the scores."""
    y = node.outputs[0]
    dims = {key: out.virtual.get(slot) if slot in out.virtual else ctx.dim(*_tensor_axis(node, slot))
            for key, slot in hidden.items()}
    sizes = {key: d for key, d in dims.items() if isinstance(d, int)}
    if not (isinstance(q_count, int) and isinstance(kv_count, int) and q_count and kv_count
            and len(sizes) == len(dims)
            and sizes["q"] % q_count == 0 and sizes["k"] % kv_count == 0 and sizes["v"] % kv_count == 0
            and sizes["q"] // q_count == sizes["k"] // kv_count and sizes["y"] % q_count == 0):
        freeze_node(node, ctx, out, f"{node_label(node)}: head counts do not divide the hidden sizes")
        return
    q_heads, kv_heads = fused_head_slots(node)
    q_dim, v_dim = (f"{y.name}#head_dim", 0), (f"{y.name}#v_head_dim", 0)
    reason = f"{node_label(node)} splits this axis into heads"
    q_size, v_size = sizes["q"] // q_count, sizes["v"] // kv_count
    _split_heads(out, reason, {hidden["q"]: (q_heads, q_dim, q_count, q_size),
                               hidden["k"]: (kv_heads, q_dim, kv_count, q_size),
                               hidden["v"]: (kv_heads, v_dim, kv_count, v_size),
                               hidden["y"]: (q_heads, v_dim, q_count, sizes["y"] // q_count)})
    out.mark_inexact(q_dim, f"{node_label(node)} contracts this axis between two activations")
    _heads(out, ctx, node, q_heads, kv_heads, q_count, kv_count)
    for cache, axis, part in caches:
        if cache is not None:
            out.couple((node.inputs[0].name, 0), (cache.name, axis - 1))
            out.couple(kv_heads, (cache.name, axis))
            out.couple(q_dim if part == "k" else v_dim, (cache.name, axis + 2))
    if bias is not None and ctx.rank(bias) == 4 and ctx.dim(bias, 1) != 1:
        if ctx.dim(bias, 1) == q_count:
            out.couple(q_heads, (bias.name, 1))
        else:
            out.freeze((bias.name, 1), f"{node_label(node)}: cannot tell how the attention bias broadcasts")


def _tensor_axis(node: gs.Node, slot: Slot) -> tuple[gs.Tensor, int]:
    tensors = {t.name: t for t in [*node.inputs, *node.outputs] if t is not None and t.name}
    return tensors[slot[0]], slot[1]


def ms_attention(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """com.microsoft Attention: X [batch, seq, in] times a packed weight [in, Q + K + V] (+ bias),
    split into `num_heads` heads (sizes from `qkv_hidden_sizes`, else three equal parts); past and
    present are [2, batch, heads, seq, head_dim]."""
    x, weight, y = node.inputs[0], node.inputs[1], node.outputs[0]
    bias = optional_tensor(node, 2)
    heads = node.attrs.get("num_heads")
    total = ctx.dim(weight, 1)
    parts = list(node.attrs.get("qkv_hidden_sizes") or
                 ([total // 3] * 3 if isinstance(total, int) and total % 3 == 0 else []))
    if ctx.rank(x) != 3 or ctx.rank(weight) != 2 or ctx.rank(y) != 3 or len(parts) != 3 or sum(parts) != total:
        freeze_node(node, ctx, out, f"{node_label(node)}: unsupported input shapes or qkv_hidden_sizes")
        return
    for axis in (0, 1):
        out.couple((x.name, axis), (y.name, axis))
    out.couple((x.name, 2), (weight.name, 0))
    if bias is not None:
        out.couple((bias.name, 0), (weight.name, 1))
    packed = [(f"{y.name}#{part}", 0) for part in "qkv"]
    _packed(out, (weight.name, 1), list(zip(packed, parts, strict=True)))
    caches = [(optional_tensor(node, 4), 2, "k"), (optional_tensor(node, 1, True), 2, "k")]  # K and V stacked
    _fused_attention(node, ctx, out, {"q": packed[0], "k": packed[1], "v": packed[2], "y": (y.name, 2)},
                     heads, heads, caches, optional_tensor(node, 5))


def ms_multi_head_attention(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """com.microsoft MultiHeadAttention with separate query [batch, seq, Q], key and value
    ([batch, kv_seq, K] or already split into heads, [batch, heads, kv_seq, head_dim]), an optional
    packed bias [Q + K + V] and past/present key and value [batch, heads, seq, head_dim]."""
    q, k, v, y = node.inputs[0], optional_tensor(node, 1), optional_tensor(node, 2), node.outputs[0]
    heads = node.attrs.get("num_heads")
    if k is None or v is None or ctx.rank(q) != 3 or ctx.rank(y) != 3 or ctx.rank(k) not in (3, 4) \
            or ctx.rank(v) != ctx.rank(k):
        freeze_node(node, ctx, out, f"{node_label(node)}: packed or unknown query/key/value layouts are not supported")
        return
    for axis in (0, 1):
        out.couple((q.name, axis), (y.name, axis))
    out.couple((q.name, 0), (k.name, 0))
    out.couple((k.name, 0), (v.name, 0))
    hidden: dict[str, Slot] = {"q": (q.name, 2), "y": (y.name, 2)}
    if ctx.rank(k) == 3:
        out.couple((k.name, 1), (v.name, 1))
        hidden.update(k=(k.name, 2), v=(v.name, 2))
    else:  # [batch, heads, kv_seq, head_dim]: head axes given, hidden ones virtual
        out.couple((k.name, 2), (v.name, 2))
        for tensor, part in ((k, "k"), (v, "v")):
            count, width = ctx.dim(tensor, 1), ctx.dim(tensor, 3)
            slot = (f"{y.name}#{part}", 0)
            out.virtual[slot] = count * width if isinstance(count, int) and isinstance(width, int) else None
            hidden[part] = slot
    bias = optional_tensor(node, 3)
    if bias is not None:
        sizes = all_static([ctx.dim(q, 2), ctx.dim(k, 2), ctx.dim(v, 2)]) if ctx.rank(k) == 3 else None
        if sizes is None or sum(sizes) != ctx.dim(bias, 0):
            freeze_node(node, ctx, out, f"{node_label(node)}: cannot split the packed bias")
            return
        packed = [(f"{y.name}#{part}_bias", 0) for part in "qkv"]
        _packed(out, (bias.name, 0), list(zip(packed, sizes, strict=True)))
        for part, slot in zip("qkv", packed, strict=True):
            out.couple(slot, hidden[part])
    caches = [(optional_tensor(node, 6), 1, "k"), (optional_tensor(node, 7), 1, "v"), (optional_tensor(node, 1, True), 1, "k"),
              (optional_tensor(node, 2, True), 1, "v")]
    if ctx.rank(k) == 4:
        caches += [(k, 1, "k"), (v, 1, "v")]
    _fused_attention(node, ctx, out, hidden, heads, heads, caches, optional_tensor(node, 5))


def ms_group_query_attention(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """com.microsoft GroupQueryAttention: query [batch, seq, heads * head_dim] (or Q | K | V packed
    into it when key and value are absent), `kv_num_heads` KV heads shared by `num_heads` query
    heads, past/present [batch, kv_heads, seq, head_dim], rotary embedding inside (`do_rotary`),
    an optional per-head sink."""
    q, y = node.inputs[0], node.outputs[0]
    k, v = optional_tensor(node, 1), optional_tensor(node, 2)
    q_count, kv_count = node.attrs.get("num_heads"), node.attrs.get("kv_num_heads")
    if ctx.rank(q) != 3 or ctx.rank(y) != 3 or (k is None) != (v is None) \
            or (k is not None and (ctx.rank(k) != 3 or ctx.rank(v) != 3)):
        freeze_node(node, ctx, out, f"{node_label(node)}: unsupported query/key/value layouts")
        return
    for axis in (0, 1):
        out.couple((q.name, axis), (y.name, axis))
    if k is None or v is None:  # both absent (checked above): Q | K | V packed into the query
        total, width = ctx.dim(q, 2), ctx.dim(y, 2)
        if not isinstance(total, int) or not isinstance(width, int) or not isinstance(q_count, int) \
                or not isinstance(kv_count, int) or not q_count \
                or width % q_count or total != width + 2 * kv_count * (width // q_count):
            freeze_node(node, ctx, out, f"{node_label(node)}: cannot split the packed query/key/value")
            return
        kv_width = kv_count * (width // q_count)
        packed = [(f"{y.name}#{part}", 0) for part in "qkv"]
        _packed(out, (q.name, 2), list(zip(packed, [width, kv_width, kv_width], strict=True)))
        hidden: dict[str, Slot] = {"q": packed[0], "k": packed[1], "v": packed[2], "y": (y.name, 2)}
    else:
        for tensor in (k, v):
            out.couple((q.name, 0), (tensor.name, 0))
            out.couple((q.name, 1), (tensor.name, 1))
        hidden = {"q": (q.name, 2), "k": (k.name, 2), "v": (v.name, 2), "y": (y.name, 2)}
    caches = [(optional_tensor(node, 3), 1, "k"), (optional_tensor(node, 4), 1, "v"), (optional_tensor(node, 1, True), 1, "k"),
              (optional_tensor(node, 2, True), 1, "v")]
    _fused_attention(node, ctx, out, hidden, q_count, kv_count, caches, optional_tensor(node, 10))
    sink = optional_tensor(node, 11)
    if sink is not None:
        out.couple(fused_head_slots(node)[0], (sink.name, 0))


def fix_attention(node: gs.Node, ctx: RewriteContext) -> None:
    """3-D Attention: `q_num_heads` and `kv_num_heads` become the heads kept."""
    for slot, attribute in zip(head_slots(node), ("q_num_heads", "kv_num_heads"), strict=True):
        kept = ctx.kept.get(slot)
        if kept is not None and attribute in node.attrs:
            node.attrs[attribute] = len(kept)


def fix_rotary_embedding(node: gs.Node, ctx: RewriteContext) -> None:
    """`num_heads` follows the heads kept (the heads axis of a 4-D input, the factor of a 3-D one)."""
    x = node.inputs[0]
    if "num_heads" not in node.attrs or x.shape is None:
        return
    if len(x.shape) == 4:
        kept = ctx.kept_of(x, 1)
        heads = None if kept is None else len(kept)
    else:
        kept = ctx.kept.get((f"{node.outputs[0].name}#heads", 0))
        heads = None if kept is None else len(kept)
    ratio = ctx.ratio_of((x.name, 1)) if len(x.shape) == 4 else None
    if heads is None and ratio is not None and ratio != 1:
        heads = int(node.attrs["num_heads"] * ratio)
    if heads is not None:
        node.attrs["num_heads"] = heads


def fix_fused_attention(node: gs.Node, ctx: RewriteContext) -> None:
    """com.microsoft Attention / MultiHeadAttention / GroupQueryAttention: `num_heads` (and
    `kv_num_heads`) become the heads kept; Attention's `qkv_hidden_sizes` shrink with them."""
    q_slot, kv_slot = fused_head_slots(node)
    q_kept, kv_kept = ctx.kept.get(q_slot), ctx.kept.get(kv_slot)
    if q_kept is not None and "num_heads" in node.attrs:
        before = node.attrs["num_heads"]
        node.attrs["num_heads"] = len(q_kept)
        if "qkv_hidden_sizes" in node.attrs:
            node.attrs["qkv_hidden_sizes"] = [size // before * len(q_kept) for size in node.attrs["qkv_hidden_sizes"]]
    if kv_kept is not None and "kv_num_heads" in node.attrs:
        node.attrs["kv_num_heads"] = len(kv_kept)


def _attention_macs(node: gs.Node) -> int:
    """com.microsoft Attention projects X [B, S, in] with its packed weight [in, Q + K + V] (the
    score and value products, like those of ONNX Attention, are not counted: their sequence
    lengths are symbolic)."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if node.domain != "com.microsoft" or not isinstance(weight, gs.Constant) or weight.values.ndim != 2:
        return 0
    return numel(node.inputs[0]) * int(weight.values.shape[1])


def lower_attention(q, k, v, mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None, is_causal=0,
                   q_num_heads=None, kv_num_heads=None, qk_matmul_output_mode=0, scale=None, softcap=0.0,
                   softmax_precision=None):
    """ONNX Attention (opset 23): 3-D inputs are split into heads by the attributes; KV heads are
    repeated for grouped-query attention. Returns (Y, present_key, present_value, qk_output)."""
    three_d = q.dim() == 3
    if three_d:
        batch, seq = q.shape[0], q.shape[1]
        q = q.reshape(batch, seq, q_num_heads, -1).transpose(1, 2)
        k = k.reshape(batch, k.shape[1], kv_num_heads, -1).transpose(1, 2)
        v = v.reshape(batch, v.shape[1], kv_num_heads, -1).transpose(1, 2)
    if past_key is not None:
        k, v = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
    present_key, present_value = k, v
    repeat = q.shape[1] // k.shape[1]
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    stages = [scores]
    if is_causal:
        q_len, kv_len = scores.shape[-2], scores.shape[-1]
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).tril(kv_len - q_len)
        scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    stages.append(scores)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    stages.append(scores)
    probs = torch.softmax(scores, dim=-1)
    stages.append(probs)
    y = torch.matmul(probs, v)
    if three_d:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    return y, present_key, present_value, stages[qk_matmul_output_mode]


def lower_rotary_embedding(x, cos, sin, position_ids=None, interleaved=0, num_heads=0, rotary_embedding_dim=0):
    """ONNX RotaryEmbedding (opset 23) on [batch, heads, seq, head_dim] or [batch, seq, hidden]."""
    three_d = x.dim() == 3
    if three_d:
        batch, seq = x.shape[0], x.shape[1]
        x = x.reshape(batch, seq, num_heads, -1).transpose(1, 2)
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]
    rotary = (rotary_embedding_dim or x.shape[-1]) // 2
    # [batch, 1, seq, rotary_dim / 2]
    y = _rotate(x, cos[..., :rotary].unsqueeze(1), sin[..., :rotary].unsqueeze(1), interleaved)
    return y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1) if three_d else y


def _to_heads(x, count):
    """[batch, seq, count * dim] -> [batch, count, seq, dim]."""
    return x.reshape(x.shape[0], x.shape[1], count, -1).transpose(1, 2)


def _merge_heads(y):
    """[batch, heads, seq, dim] -> [batch, seq, heads * dim]."""
    return y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)


def _key_mask(mask, batch: int, kv_len: int):
    """A com.microsoft key mask as booleans [batch, 1, 1, kv_len] (True = attend): valid lengths
    [batch] (right padding) or 0/1 flags [batch, kv_len]."""
    if mask.dim() == 1 and mask.shape[0] == batch:
        return (torch.arange(kv_len, device=mask.device)[None, :] < mask[:, None].long())[:, None, None, :]
    if mask.dim() == 2:
        return (mask != 0)[:, None, None, :]
    raise LoweringError(f"attention mask of shape {tuple(mask.shape)} is not supported")


def _fused_scores(q, k, v, allowed, filter_value, scale, attention_bias=None):
    """softmax(Q K^T * scale + bias, masked by adding `filter_value` where not `allowed`) V."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if allowed is not None:
        scores = scores + (~allowed).to(scores.dtype) * filter_value
    if attention_bias is not None:
        scores = scores + attention_bias
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _causal(q_len: int, kv_len: int, device):
    """[q_len, kv_len] booleans: query i (after kv_len - q_len past tokens) sees keys up to it."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


def lower_ms_attention(x, weight, bias=None, mask_index=None, past=None, attention_bias=None, past_sequence_length=None,
                 num_heads=1, qkv_hidden_sizes=None, unidirectional=0, mask_filter_value=-10000.0, scale=None,
                 do_rotary=0, past_present_share_buffer=0, rotary_embedding_dim=0):
    """com.microsoft Attention: packed Q|K|V projection, heads, optional past [2, B, H, P, D].
    Returns (output, present)."""
    if do_rotary or past_present_share_buffer:
        raise LoweringError("Attention with do_rotary or a shared past/present buffer is not supported")
    qkv = torch.matmul(x, weight) if bias is None else torch.matmul(x, weight) + bias
    sizes = qkv_hidden_sizes or [weight.shape[1] // 3] * 3
    q, k, v = (_to_heads(t, num_heads) for t in torch.split(qkv, list(sizes), dim=-1))
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    allowed = None
    if mask_index is not None:
        allowed = _key_mask(mask_index, x.shape[0], k.shape[2])
    if unidirectional:
        causal = _causal(q.shape[2], k.shape[2], q.device)
        allowed = causal if allowed is None else allowed & causal
    y = _fused_scores(q, k, v, allowed, mask_filter_value, scale, attention_bias)
    return _merge_heads(y), torch.stack([k, v])


def lower_ms_multi_head_attention(query, key=None, value=None, bias=None, key_padding_mask=None, attention_bias=None,
                            past_key=None, past_value=None, past_sequence_length=None, cache_indirection=None,
                            num_heads=1, mask_filter_value=-10000.0, scale=None, unidirectional=0):
    """com.microsoft MultiHeadAttention with separate query/key/value ([B, S, hidden], or key and
    value already [B, H, L, D]), packed bias, past/present key and value. Returns (output,
    present_key, present_value)."""
    if key is None or value is None or query.dim() != 3 or cache_indirection is not None:
        raise LoweringError("MultiHeadAttention with packed query/key/value is not supported")
    if bias is not None:
        q_size, k_size = query.shape[-1], key.shape[-1]
        query = query + bias[:q_size]
        key, value = key + bias[q_size:q_size + k_size], value + bias[q_size + k_size:]
    q = _to_heads(query, num_heads)
    k, v = (_to_heads(t, num_heads) if t.dim() == 3 else t for t in (key, value))
    if past_key is not None:
        k, v = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
    allowed = None if key_padding_mask is None else _key_mask(key_padding_mask, q.shape[0], k.shape[2])
    if unidirectional:
        causal = _causal(q.shape[2], k.shape[2], q.device)
        allowed = causal if allowed is None else allowed & causal
    y = _fused_scores(q, k, v, allowed, mask_filter_value, scale, attention_bias)
    return _merge_heads(y), k, v


def _rotate(x, cos, sin, interleaved: int):
    """Rotary embedding of the first 2 * cos.shape[-1] features of [B, H, S, D] (cos: [S, D'/2])."""
    rotary = 2 * cos.shape[-1]
    rotated, passed = x[..., :rotary], x[..., rotary:]
    if interleaved:
        first, second = rotated[..., 0::2], rotated[..., 1::2]
    else:
        first, second = rotated.chunk(2, dim=-1)
    a, b = first * cos - second * sin, second * cos + first * sin
    rotated = torch.stack([a, b], dim=-1).flatten(-2) if interleaved else torch.cat([a, b], dim=-1)
    return torch.cat([rotated, passed], dim=-1)


def lower_ms_group_query_attention(query, key=None, value=None, past_key=None, past_value=None, seqlens_k=None,
                             total_sequence_length=None, cos_cache=None, sin_cache=None, position_ids=None,
                             attention_bias=None, head_sink=None, num_heads=1, kv_num_heads=1, scale=None,
                             do_rotary=0, rotary_interleaved=0, local_window_size=-1, softcap=0.0,
                             smooth_softmax=0, qk_output=0):
    """com.microsoft GroupQueryAttention, for batches whose sequences all have the past length of
    the cache (no padding inside the past): packed or separate Q/K/V, rotary, causal attention up
    to `seqlens_k + 1` keys. Returns (output, present_key, present_value)."""
    if head_sink is not None or smooth_softmax or softcap or qk_output:
        raise LoweringError("GroupQueryAttention with head_sink, smooth_softmax, softcap or qk output is not supported")
    if key is None:
        width = query.shape[-1] * num_heads // (num_heads + 2 * kv_num_heads)
        kv_width = width // num_heads * kv_num_heads
        query, key, value = torch.split(query, [width, kv_width, kv_width], dim=-1)
    q, k, v = _to_heads(query, num_heads), _to_heads(key, kv_num_heads), _to_heads(value, kv_num_heads)
    past = 0 if past_key is None else past_key.shape[2]
    seq = q.shape[2]
    if do_rotary:
        positions = position_ids if position_ids is not None else \
            (past + torch.arange(seq, device=q.device))[None].expand(q.shape[0], seq)
        cos, sin = cos_cache[positions][:, None], sin_cache[positions][:, None]
        q, k = _rotate(q, cos, sin, rotary_interleaved), _rotate(k, cos, sin, rotary_interleaved)
    if past_key is not None:
        k, v = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
    present_key, present_value = k, v
    repeat = num_heads // kv_num_heads
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    kv_len = k.shape[2]
    position = torch.arange(seq, device=q.device)[:, None] + (kv_len - seq)
    key = torch.arange(kv_len, device=q.device)[None, :]
    allowed = key <= position
    if local_window_size is not None and local_window_size >= 0:
        allowed = allowed & (key > position - local_window_size)
    allowed = allowed[None, None]
    if seqlens_k is not None:
        valid = torch.arange(kv_len, device=q.device)[None, :] <= seqlens_k[:, None].long()
        allowed = allowed & valid[:, None, None, :]
    y = _fused_scores(q, k, v, allowed, torch.finfo(q.dtype).min, scale, attention_bias)
    return _merge_heads(y), present_key, present_value


register("Attention", rule=attention, fixup=fix_attention, lowering=lower_attention, cost=_attention_macs,
         multi_output=True)
register("RotaryEmbedding", rule=rotary_embedding, fixup=fix_rotary_embedding, lowering=lower_rotary_embedding,
         cost=ELEMENTWISE)
register("Attention", "com.microsoft", rule=ms_attention, fixup=fix_fused_attention, lowering=lower_ms_attention,
         cost=_attention_macs, multi_output=True)
register("MultiHeadAttention", "com.microsoft", rule=ms_multi_head_attention, fixup=fix_fused_attention,
         lowering=lower_ms_multi_head_attention, cost=ELEMENTWISE, multi_output=True)
register("GroupQueryAttention", "com.microsoft", rule=ms_group_query_attention, fixup=fix_fused_attention,
         lowering=lower_ms_group_query_attention, cost=ELEMENTWISE, multi_output=True)
