"""Dependency rules for the ONNX attention ops of opset 23: Attention, RotaryEmbedding and
RMSNormalization (what `torch.onnx.export(..., opset_version=23)` emits for SDPA, rotary
embeddings and RMSNorm); and, in `CONTRIB_RULES`, the com.microsoft ops ONNX Runtime's transformer
optimizer fuses around attention (SkipLayerNormalization, BiasGelu, FastGelu).

Attention takes Q, K, V either as [batch, heads, seq, head_dim] or as [batch, seq, heads *
head_dim] with `q_num_heads` / `kv_num_heads` attributes. Query heads and the output's heads are
one axis; with grouped-query attention (more query than KV heads) a KV head carries its
`q_heads / kv_heads` consecutive query heads, as in the Unsqueeze -> Expand -> Reshape pattern.
In the 3-D form the heads are virtual slots factored out of the hidden axes, and the rewrite sets
the head-count attributes to the heads kept (`head_slots`).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from graphprune.rules import Couplings, Rule, RuleContext, Slot, _where, broadcast, freeze_node, layer_norm


def head_slots(node: gs.Node) -> tuple[Slot, Slot]:
    """The virtual slots of an Attention node's query heads and KV heads (3-D inputs)."""
    return (f"{node.outputs[0].name}#q_heads", 0), (f"{node.outputs[0].name}#kv_heads", 0)


def _optional(node: gs.Node, index: int, outputs: bool = False) -> gs.Tensor | None:
    tensors = node.outputs if outputs else node.inputs
    return tensors[index] if index < len(tensors) and tensors[index] is not None and tensors[index].name else None


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
                       f"{_where(node)}: query-head pruning keeps every KV head")
        else:
            out.block(kv_heads, q_heads, q_count // kv_count)
    else:
        reason = f"{_where(node)}: {q_count} query heads cannot share {kv_count} KV heads"
        out.freeze(q_heads, reason)
        out.freeze(kv_heads, reason)
        return False
    out.produced[q_heads] = "head"
    return True


def attention(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Y = softmax(Q K^T * scale + mask) V, per head; optional past/present KV and the QK output."""
    q, k, v = node.inputs[:3]
    y = node.outputs[0]
    mask = _optional(node, 3)
    past = [t for t in (_optional(node, 4), _optional(node, 5))]
    present = [_optional(node, 1, True), _optional(node, 2, True)]
    qk_output = _optional(node, 3, True)
    rank = ctx.rank(q)
    if rank not in (3, 4) or ctx.rank(k) != rank or ctx.rank(v) != rank or ctx.rank(y) != rank:
        freeze_node(node, ctx, out, f"{_where(node)}: unknown or unsupported input ranks")
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
        sizes = [ctx.dim(t, 2) for t in (q, k, v, y)]
        if not isinstance(q_count, int) or not isinstance(kv_count, int) or not all(isinstance(s, int) for s in sizes) \
                or sizes[0] % q_count or sizes[1] % kv_count or sizes[2] % kv_count or sizes[3] % q_count:
            freeze_node(node, ctx, out, f"{_where(node)}: head counts do not divide the hidden sizes")
            return
        q_heads, kv_heads = head_slots(node)
        q_dim, v_dim = (f"{y.name}#head_dim", 0), (f"{y.name}#v_head_dim", 0)
        out.virtual.update({q_heads: q_count, kv_heads: kv_count, q_dim: sizes[0] // q_count,
                            v_dim: sizes[2] // kv_count})
        reason = f"{_where(node)} splits this axis into heads"
        out.factor((q.name, 2), [q_heads, q_dim], [q_count, sizes[0] // q_count], reason)
        out.factor((k.name, 2), [kv_heads, q_dim], [kv_count, sizes[1] // kv_count], reason)
        out.factor((v.name, 2), [kv_heads, v_dim], [kv_count, sizes[2] // kv_count], reason)
        out.factor((y.name, 2), [q_heads, v_dim], [q_count, sizes[3] // q_count], reason)
        out.couple((q.name, 1), (y.name, 1))
        out.couple((k.name, 1), (v.name, 1))
        scores = q_heads
    out.mark_inexact(q_dim, f"{_where(node)} contracts this axis between two activations")
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
                out.freeze((mask.name, mask_rank - 3), f"{_where(node)}: cannot tell how the mask broadcasts")


def rotary_embedding(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Rotates pairs of head_dim features of every head: X and Y are the same slots; the rotated
    axis and the cos/sin caches stay as they are. 3-D input: heads are factored out of the hidden
    axis with `num_heads`, which the rewrite updates."""
    x, y = node.inputs[0], node.outputs[0]
    rank = ctx.rank(x)
    if rank not in (3, 4):
        freeze_node(node, ctx, out, f"{_where(node)}: unknown input rank")
        return
    for axis in range(rank):
        out.couple((x.name, axis), (y.name, axis))
    reason = f"{_where(node)} rotates this axis"
    if rank == 4:
        out.freeze((x.name, 3), reason)
        return
    heads = node.attrs.get("num_heads")
    size = ctx.dim(x, 2)
    if not isinstance(heads, int) or not isinstance(size, int) or size % heads:
        out.freeze((x.name, 2), f"{_where(node)}: num_heads does not divide the hidden size")
        return
    head_slot, dim_slot = (f"{y.name}#heads", 0), (f"{y.name}#head_dim", 0)
    out.virtual.update({head_slot: heads, dim_slot: size // heads})
    out.factor((x.name, 2), [head_slot, dim_slot], [heads, size // heads], reason)
    out.freeze(dim_slot, reason)
    out.produced[head_slot] = "head"


def rms_norm(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """RMSNormalization: LayerNormalization without the mean and the bias."""
    layer_norm(node, ctx, out)


ATTENTION_RULES: dict[str, Rule] = {
    "Attention": attention,
    "RotaryEmbedding": rotary_embedding,
    "RMSNormalization": rms_norm,
    # ONNX Runtime registers its RMSNorm in the default domain (the onnxruntime-genai builder writes it)
    "SimplifiedLayerNormalization": rms_norm,
}


# -- com.microsoft ops that ONNX Runtime's transformer optimizer writes around attention ------------
def skip_layer_norm(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """SkipLayerNormalization / SkipSimplifiedLayerNormalization: LayerNorm(input + skip + bias)
    over the last axis; the sum is an optional 4th output. Input, skip, bias and the sum broadcast
    like an Add; gamma and beta follow the normalized axis; mean and inv_std are frozen."""
    x, y = node.inputs[0], node.outputs[0]
    rank = ctx.rank(x)
    if rank is None:
        freeze_node(node, ctx, out, f"{_where(node)}: unknown input rank")
        return
    summed = [t for t in (node.inputs[1], _optional(node, 4)) if t is not None and t.name]
    broadcast(node, ctx, out, [x, *summed], y)
    total = _optional(node, 3, True)
    if total is not None:
        for axis in range(rank):
            out.couple((y.name, axis), (total.name, axis))
    hidden = (y.name, rank - 1)
    for param in (node.inputs[2], _optional(node, 3)) if node.op == "SkipLayerNormalization" else (node.inputs[2],):
        if param is not None and param.name:
            out.couple((param.name, (ctx.rank(param) or 1) - 1), hidden)
    out.mark_inexact(hidden, f"{_where(node)} normalizes over this axis")
    out.produced[hidden] = "hidden"
    for extra in (_optional(node, 1, True), _optional(node, 2, True)):
        if extra is not None:
            out.freeze_tensor(extra, f"{_where(node)}: mean/inv-std outputs")


def bias_activation(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """BiasGelu / FastGelu / Gelu / QuickGelu: an activation of input + bias (elementwise)."""
    for output in node.outputs[:1]:
        broadcast(node, ctx, out, [t for t in node.inputs if t is not None and t.name], output)


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


def _fused_attention(node: gs.Node, ctx: RuleContext, out: Couplings, hidden: dict[str, Slot | None],
                     q_count: object, kv_count: object, caches: list[tuple[gs.Tensor | None, int, str]],
                     bias: gs.Tensor | None = None) -> None:
    """What the com.microsoft attention ops share. `hidden` gives the slots of the q/k/v/output
    hidden axes (packed ones are virtual); they are split into heads of `q_count` / `kv_count`.
    `caches` are (tensor, heads axis, "k" or "v"): [batch, kv_heads, seq, head_dim] tensors
    (Attention's past is [2, batch, heads, seq, head_dim]); `bias` [batch|1, heads|1, q, kv] is
    added to the scores."""
    y = node.outputs[0]
    sizes = {key: out.virtual.get(slot) if slot in out.virtual else ctx.dim(*_tensor_axis(node, slot))
             for key, slot in hidden.items() if slot is not None}
    if not (isinstance(q_count, int) and isinstance(kv_count, int) and q_count and kv_count
            and all(isinstance(s, int) for s in sizes.values())
            and sizes["q"] % q_count == 0 and sizes["k"] % kv_count == 0 and sizes["v"] % kv_count == 0
            and sizes["q"] // q_count == sizes["k"] // kv_count and sizes["y"] % q_count == 0):
        freeze_node(node, ctx, out, f"{_where(node)}: head counts do not divide the hidden sizes")
        return
    q_heads, kv_heads = fused_head_slots(node)
    q_dim, v_dim = (f"{y.name}#head_dim", 0), (f"{y.name}#v_head_dim", 0)
    reason = f"{_where(node)} splits this axis into heads"
    q_size, v_size = sizes["q"] // q_count, sizes["v"] // kv_count
    _split_heads(out, reason, {hidden["q"]: (q_heads, q_dim, q_count, q_size),
                               hidden["k"]: (kv_heads, q_dim, kv_count, q_size),
                               hidden["v"]: (kv_heads, v_dim, kv_count, v_size),
                               hidden["y"]: (q_heads, v_dim, q_count, sizes["y"] // q_count)})
    out.mark_inexact(q_dim, f"{_where(node)} contracts this axis between two activations")
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
            out.freeze((bias.name, 1), f"{_where(node)}: cannot tell how the attention bias broadcasts")


def _tensor_axis(node: gs.Node, slot: Slot) -> tuple[gs.Tensor, int]:
    tensors = {t.name: t for t in [*node.inputs, *node.outputs] if t is not None and t.name}
    return tensors[slot[0]], slot[1]


def ms_attention(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """com.microsoft Attention: X [batch, seq, in] times a packed weight [in, Q + K + V] (+ bias),
    split into `num_heads` heads (sizes from `qkv_hidden_sizes`, else three equal parts); past and
    present are [2, batch, heads, seq, head_dim]."""
    x, weight, y = node.inputs[0], node.inputs[1], node.outputs[0]
    bias = _optional(node, 2)
    heads = node.attrs.get("num_heads")
    total = ctx.dim(weight, 1)
    parts = list(node.attrs.get("qkv_hidden_sizes") or
                 ([total // 3] * 3 if isinstance(total, int) and total % 3 == 0 else []))
    if ctx.rank(x) != 3 or ctx.rank(weight) != 2 or ctx.rank(y) != 3 or len(parts) != 3 or sum(parts) != total:
        freeze_node(node, ctx, out, f"{_where(node)}: unsupported input shapes or qkv_hidden_sizes")
        return
    for axis in (0, 1):
        out.couple((x.name, axis), (y.name, axis))
    out.couple((x.name, 2), (weight.name, 0))
    if bias is not None:
        out.couple((bias.name, 0), (weight.name, 1))
    packed = [(f"{y.name}#{part}", 0) for part in "qkv"]
    _packed(out, (weight.name, 1), list(zip(packed, parts, strict=True)))
    caches = [(_optional(node, 4), 2, "k"), (_optional(node, 1, True), 2, "k")]  # K and V stacked
    _fused_attention(node, ctx, out, {"q": packed[0], "k": packed[1], "v": packed[2], "y": (y.name, 2)},
                     heads, heads, caches, _optional(node, 5))


def ms_multi_head_attention(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """com.microsoft MultiHeadAttention with separate query [batch, seq, Q], key and value
    ([batch, kv_seq, K] or already split into heads, [batch, heads, kv_seq, head_dim]), an optional
    packed bias [Q + K + V] and past/present key and value [batch, heads, seq, head_dim]."""
    q, k, v, y = node.inputs[0], _optional(node, 1), _optional(node, 2), node.outputs[0]
    heads = node.attrs.get("num_heads")
    if k is None or v is None or ctx.rank(q) != 3 or ctx.rank(y) != 3 or ctx.rank(k) not in (3, 4) \
            or ctx.rank(v) != ctx.rank(k):
        freeze_node(node, ctx, out, f"{_where(node)}: packed or unknown query/key/value layouts are not supported")
        return
    for axis in (0, 1):
        out.couple((q.name, axis), (y.name, axis))
    out.couple((q.name, 0), (k.name, 0))
    out.couple((k.name, 0), (v.name, 0))
    hidden: dict[str, Slot | None] = {"q": (q.name, 2), "y": (y.name, 2)}
    if ctx.rank(k) == 3:
        out.couple((k.name, 1), (v.name, 1))
        hidden.update(k=(k.name, 2), v=(v.name, 2))
    else:  # [batch, heads, kv_seq, head_dim]: head axes given, hidden ones virtual
        out.couple((k.name, 2), (v.name, 2))
        for tensor, part in ((k, "k"), (v, "v")):
            size = ctx.dim(tensor, 1), ctx.dim(tensor, 3)
            slot = (f"{y.name}#{part}", 0)
            out.virtual[slot] = size[0] * size[1] if all(isinstance(s, int) for s in size) else None
            hidden[part] = slot
    bias = _optional(node, 3)
    if bias is not None:
        sizes = [ctx.dim(q, 2), ctx.dim(k, 2), ctx.dim(v, 2)] if ctx.rank(k) == 3 else [None]
        if not all(isinstance(s, int) for s in sizes) or sum(sizes) != ctx.dim(bias, 0):
            freeze_node(node, ctx, out, f"{_where(node)}: cannot split the packed bias")
            return
        packed = [(f"{y.name}#{part}_bias", 0) for part in "qkv"]
        _packed(out, (bias.name, 0), list(zip(packed, sizes, strict=True)))
        for part, slot in zip("qkv", packed, strict=True):
            out.couple(slot, hidden[part])
    caches = [(_optional(node, 6), 1, "k"), (_optional(node, 7), 1, "v"), (_optional(node, 1, True), 1, "k"),
              (_optional(node, 2, True), 1, "v")]
    if ctx.rank(k) == 4:
        caches += [(k, 1, "k"), (v, 1, "v")]
    _fused_attention(node, ctx, out, hidden, heads, heads, caches, _optional(node, 5))


def ms_group_query_attention(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """com.microsoft GroupQueryAttention: query [batch, seq, heads * head_dim] (or Q | K | V packed
    into it when key and value are absent), `kv_num_heads` KV heads shared by `num_heads` query
    heads, past/present [batch, kv_heads, seq, head_dim], rotary embedding inside (`do_rotary`),
    an optional per-head sink."""
    q, y = node.inputs[0], node.outputs[0]
    k, v = _optional(node, 1), _optional(node, 2)
    q_count, kv_count = node.attrs.get("num_heads"), node.attrs.get("kv_num_heads")
    if ctx.rank(q) != 3 or ctx.rank(y) != 3 or (k is None) != (v is None) \
            or (k is not None and (ctx.rank(k) != 3 or ctx.rank(v) != 3)):
        freeze_node(node, ctx, out, f"{_where(node)}: unsupported query/key/value layouts")
        return
    for axis in (0, 1):
        out.couple((q.name, axis), (y.name, axis))
    if k is None:
        total, width = ctx.dim(q, 2), ctx.dim(y, 2)
        if not all(isinstance(s, int) for s in (total, width, q_count, kv_count)) or not q_count \
                or width % q_count or total != width + 2 * kv_count * (width // q_count):
            freeze_node(node, ctx, out, f"{_where(node)}: cannot split the packed query/key/value")
            return
        kv_width = kv_count * (width // q_count)
        packed = [(f"{y.name}#{part}", 0) for part in "qkv"]
        _packed(out, (q.name, 2), list(zip(packed, [width, kv_width, kv_width], strict=True)))
        hidden: dict[str, Slot | None] = {"q": packed[0], "k": packed[1], "v": packed[2], "y": (y.name, 2)}
    else:
        for tensor in (k, v):
            out.couple((q.name, 0), (tensor.name, 0))
            out.couple((q.name, 1), (tensor.name, 1))
        hidden = {"q": (q.name, 2), "k": (k.name, 2), "v": (v.name, 2), "y": (y.name, 2)}
    caches = [(_optional(node, 3), 1, "k"), (_optional(node, 4), 1, "v"), (_optional(node, 1, True), 1, "k"),
              (_optional(node, 2, True), 1, "v")]
    _fused_attention(node, ctx, out, hidden, q_count, kv_count, caches, _optional(node, 10))
    sink = _optional(node, 11)
    if sink is not None:
        out.couple(fused_head_slots(node)[0], (sink.name, 0))


def ms_embed_layer_norm(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """com.microsoft EmbedLayerNormalization: LayerNorm(word[ids] + position[pos] + segment[seg]);
    the tables' feature axis, gamma and beta follow the hidden axis; mask_index is frozen."""
    ids, y = node.inputs[0], node.outputs[0]
    total = _optional(node, 2, True)
    for axis in (0, 1):
        out.couple((ids.name, axis), (y.name, axis))
    hidden = (y.name, 2)
    for index in (2, 3, 4):
        table = _optional(node, index)
        if table is not None:
            out.couple((table.name, 1), hidden)
    for index in (5, 6):
        param = _optional(node, index)
        if param is not None:
            out.couple((param.name, 0), hidden)
    if total is not None:
        for axis in range(3):
            out.couple((y.name, axis), (total.name, axis))
    out.mark_inexact(hidden, f"{_where(node)} normalizes over this axis")
    out.produced[hidden] = "hidden"


#: (rules for the com.microsoft domain) op type -> dependency rule
CONTRIB_RULES: dict[str, Rule] = {
    "Attention": ms_attention,
    "MultiHeadAttention": ms_multi_head_attention,
    "GroupQueryAttention": ms_group_query_attention,
    "EmbedLayerNormalization": ms_embed_layer_norm,
    "SkipLayerNormalization": skip_layer_norm,
    "SkipSimplifiedLayerNormalization": skip_layer_norm,
    "BiasGelu": bias_activation,
    "FastGelu": bias_activation,
    "Gelu": bias_activation,
    "QuickGelu": bias_activation,
}
