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


#: (rules for the com.microsoft domain) op type -> dependency rule
CONTRIB_RULES: dict[str, Rule] = {
    "SkipLayerNormalization": skip_layer_norm,
    "SkipSimplifiedLayerNormalization": skip_layer_norm,
    "BiasGelu": bias_activation,
    "FastGelu": bias_activation,
    "Gelu": bias_activation,
    "QuickGelu": bias_activation,
}
