"""Lowering: an ONNX graph as a torch.fx GraphModule whose float initializers are nn.Parameters.

This gives gradients for any supported ONNX model, not only for ones exported from our own torch
code: Taylor scores, reconstruction and distillation all run on the lowered module, and
`write_back` copies trained parameters into the ONNX initializers again.

One table, `LOWERINGS`, maps an op type to a module-level function of (inputs..., **attributes)
that follows the ONNX definition with torch ops. Attributes are plain Python values, so the fx
graph prints and recompiles like any other. An op without a row raises `LoweringError` naming it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
import torch.nn.functional as F  # noqa: N812
from torch import fx, nn

from graphprune.errors import GraphpruneError
from graphprune.ir import Model
from graphprune.weights import replacement


class LoweringError(GraphpruneError):
    """The graph holds an op (or an attribute value) the lowering does not support."""


def _dtype(onnx_type: int) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, onnx.helper.tensor_dtype_to_np_dtype(onnx_type))).dtype


def _ints(t: torch.Tensor | list | None) -> list[int] | None:
    if t is None:
        return None
    return [int(v) for v in (t if isinstance(t, list | tuple) else t.reshape(-1).tolist())]


# -- elementwise ---------------------------------------------------------------------------------------
def _unary(fn: Callable) -> Callable:
    def lowered(x, **_):
        return fn(x)
    lowered.__name__ = f"onnx_{getattr(fn, '__name__', 'op')}"
    return lowered


def onnx_div(a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def onnx_pow(a, b):
    return torch.pow(a, b).to(a.dtype)


def onnx_variadic(*xs, op: str):
    fn = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add}.get(op)
    if op == "Mean":
        return onnx_variadic(*xs, op="Sum") / len(xs)
    out = xs[0]
    for x in xs[1:]:
        out = fn(out, x)
    return out


def onnx_clip(x, lo=None, hi=None, min=None, max=None):  # noqa: A002  (opset < 11 attributes)
    lo = lo if lo is not None else min
    hi = hi if hi is not None else max
    return torch.clamp(x, lo, hi)


def onnx_gelu(x, approximate="none"):
    return F.gelu(x, approximate=approximate)


def onnx_leaky_relu(x, alpha=0.01):
    return F.leaky_relu(x, alpha)


def onnx_elu(x, alpha=1.0):
    return F.elu(x, alpha)


def onnx_celu(x, alpha=1.0):
    return F.celu(x, alpha)


def onnx_selu(x, alpha=1.67326319217681884765625, gamma=1.05070102214813232421875):
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


def onnx_hard_sigmoid(x, alpha=0.2, beta=0.5):
    return torch.clamp(alpha * x + beta, 0, 1)


def onnx_thresholded_relu(x, alpha=1.0):
    return torch.where(x > alpha, x, torch.zeros_like(x))


def onnx_prelu(x, slope):
    return torch.where(x >= 0, x, x * slope)


def onnx_is_inf(x, detect_negative=1, detect_positive=1):
    return (torch.isinf(x) & (x > 0) & bool(detect_positive)) | (torch.isinf(x) & (x < 0) & bool(detect_negative))


def onnx_cast(x, to):
    return x.to(_dtype(to))


def onnx_cast_like(x, like, **_):
    return x.to(like.dtype)


def onnx_where(c, a, b):
    return torch.where(c, a, b)


def onnx_identity(x, *_, **__):
    return x


# -- linear algebra and normalization --------------------------------------------------------------------
def onnx_gemm(a, b, c=None, alpha=1.0, beta=1.0, transA=0, transB=0):  # noqa: N803
    a = a.t() if transA else a
    b = b.t() if transB else b
    y = alpha * (a @ b)
    return y if c is None else y + beta * c


def onnx_matmul(a, b):
    return torch.matmul(a, b)


def _channel_view(v: torch.Tensor, rank: int) -> torch.Tensor:
    return v.reshape([1, -1] + [1] * (rank - 2))


def onnx_batch_norm(x, scale, bias, mean, var, epsilon=1e-5, momentum=0.9, training_mode=0, spatial=1):
    rank = x.dim()
    inv = torch.rsqrt(_channel_view(var, rank) + epsilon)
    return (x - _channel_view(mean, rank)) * inv * _channel_view(scale, rank) + _channel_view(bias, rank)


def onnx_layer_norm(x, scale, bias=None, axis=-1, epsilon=1e-5, stash_type=1):
    axes = list(range(axis % x.dim(), x.dim()))
    mean = x.mean(dim=axes, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + epsilon) * scale
    return y if bias is None else y + bias


def onnx_rms_norm(x, scale, axis=-1, epsilon=1e-5, stash_type=1):
    axes = list(range(axis % x.dim(), x.dim()))
    return x * torch.rsqrt(x.square().mean(dim=axes, keepdim=True) + epsilon) * scale


def onnx_attention(q, k, v, mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None, is_causal=0,
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


def onnx_rotary_embedding(x, cos, sin, position_ids=None, interleaved=0, num_heads=0, rotary_embedding_dim=0):
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


def ms_skip_layer_norm(x, skip, gamma, beta=None, bias=None, epsilon=1e-12, simplified=False):
    """com.microsoft SkipLayerNormalization (and the simplified, RMS one): (norm(x + skip + bias),
    mean, inv_std, x + skip + bias)."""
    total = x + skip if bias is None else x + skip + bias
    mean = total.mean(dim=-1, keepdim=True)
    centred = total if simplified else total - mean
    inv_std = torch.rsqrt(centred.square().mean(dim=-1, keepdim=True) + epsilon)
    y = centred * inv_std * gamma
    return (y if beta is None else y + beta), mean, inv_std, total


def ms_skip_simplified_layer_norm(x, skip, gamma, bias=None, epsilon=1e-12):
    return ms_skip_layer_norm(x, skip, gamma, None, bias, epsilon, simplified=True)


def ms_bias_gelu(x, bias=None, approximate="none"):
    return F.gelu(x if bias is None else x + bias, approximate=approximate)


def ms_fast_gelu(x, bias=None):
    return ms_bias_gelu(x, bias, approximate="tanh")


def ms_quick_gelu(x, alpha=1.702):
    return x * torch.sigmoid(alpha * x)


def _heads(x, count):
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


def ms_attention(x, weight, bias=None, mask_index=None, past=None, attention_bias=None, past_sequence_length=None,
                 num_heads=1, qkv_hidden_sizes=None, unidirectional=0, mask_filter_value=-10000.0, scale=None,
                 do_rotary=0, past_present_share_buffer=0, rotary_embedding_dim=0):
    """com.microsoft Attention: packed Q|K|V projection, heads, optional past [2, B, H, P, D].
    Returns (output, present)."""
    if do_rotary or past_present_share_buffer:
        raise LoweringError("Attention with do_rotary or a shared past/present buffer is not supported")
    qkv = torch.matmul(x, weight) if bias is None else torch.matmul(x, weight) + bias
    sizes = qkv_hidden_sizes or [weight.shape[1] // 3] * 3
    q, k, v = (_heads(t, num_heads) for t in torch.split(qkv, list(sizes), dim=-1))
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


def ms_multi_head_attention(query, key=None, value=None, bias=None, key_padding_mask=None, attention_bias=None,
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
    q = _heads(query, num_heads)
    k, v = (_heads(t, num_heads) if t.dim() == 3 else t for t in (key, value))
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


def ms_group_query_attention(query, key=None, value=None, past_key=None, past_value=None, seqlens_k=None,
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
    q, k, v = _heads(query, num_heads), _heads(key, kv_num_heads), _heads(value, kv_num_heads)
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


def ms_embed_layer_norm(input_ids, segment_ids, word_embedding, position_embedding, segment_embedding=None,
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


def onnx_instance_norm(x, scale, bias, epsilon=1e-5):
    return F.instance_norm(x, weight=scale, bias=bias, eps=epsilon)


def onnx_group_norm(x, scale, bias, num_groups, epsilon=1e-5, stash_type=1):
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


def onnx_softmax(x, axis=-1, opset=20):
    return _coerced(x, axis if opset >= 13 else (axis if axis is not None else 1), opset, torch.softmax)


def onnx_log_softmax(x, axis=-1, opset=20):
    return _coerced(x, axis, opset, torch.log_softmax)


# -- shape and indexing ---------------------------------------------------------------------------------
def onnx_concat(*xs, axis):
    return torch.cat(xs, dim=axis)


def onnx_split(x, split=None, axis=0, num_outputs=None, outputs=1, split_attr=None):
    sizes = _ints(split) if split is not None else split_attr
    if sizes is None:
        count = num_outputs or outputs
        size = x.shape[axis]
        chunk = -(-size // count)
        sizes = [min(chunk, size - i * chunk) for i in range(count)]
    return tuple(torch.split(x, sizes, dim=axis))


def onnx_slice(x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis %= x.dim()
        size = x.shape[axis]
        if step > 0:
            start = min(max(start + size if start < 0 else start, 0), size)
            end = min(max(end + size if end < 0 else end, 0), size)
            index[axis] = slice(start, max(start, end), step)
        else:  # torch has no negative steps: slice the mirrored range, then flip
            start = min(max(start + size if start < 0 else start, -1), size - 1)
            end = min(max(end + size if end < 0 else end, -1), size - 1)
            count = max(0, -(-(start - end) // -step))
            first = start - (count - 1) * -step if count else 0
            index[axis] = slice(first, first + (count - 1) * -step + 1 if count else 0, -step)
            flips.append(axis)
    y = x[tuple(index)]
    return torch.flip(y, flips) if flips else y


def onnx_transpose(x, perm=None):
    return x.permute(perm if perm is not None else list(reversed(range(x.dim()))))


def onnx_unsqueeze(x, axes_input=None, axes=None):
    axes = _ints(axes_input) if axes_input is not None else axes
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def onnx_squeeze(x, axes_input=None, axes=None):
    axes = _ints(axes_input) if axes_input is not None else axes
    if axes is None:
        return x.squeeze()
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(axis)
    return x


def onnx_flatten(x, axis=1):
    axis = axis + x.dim() if axis < 0 else axis  # axis may equal the rank: [prod, 1]
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def onnx_reshape(x, shape, allowzero=0):
    target = _ints(shape)
    if not allowzero:
        target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
    return x.reshape(target)


def onnx_expand(x, shape):
    target = _ints(shape)
    rank = max(x.dim(), len(target))
    dims = [1] * (rank - len(target)) + target
    current = [1] * (rank - x.dim()) + list(x.shape)
    return x.reshape(current).expand([c if d == 1 else d for c, d in zip(current, dims, strict=True)])


def onnx_shape(x, start=0, end=None):
    return torch.tensor(list(x.shape), dtype=torch.int64)[start:end]


def onnx_gather(x, indices, axis=0):
    axis %= x.dim()
    idx = torch.where(indices < 0, indices + x.shape[axis], indices)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape(list(x.shape[:axis]) + list(indices.shape) + list(x.shape[axis + 1:]))


def onnx_gather_elements(x, indices, axis=0):
    axis %= x.dim()
    return torch.gather(x, axis, torch.where(indices < 0, indices + x.shape[axis], indices))


def onnx_gather_nd(x, indices, batch_dims=0):
    if batch_dims:
        raise LoweringError("GatherND with batch_dims > 0 is not supported")
    depth = indices.shape[-1]
    flat = indices.reshape(-1, depth)
    picked = x[tuple(flat[:, i] for i in range(depth))]
    return picked.reshape(list(indices.shape[:-1]) + list(x.shape[depth:]))


def onnx_range(start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def onnx_constant_of_shape(shape, value=0.0, dtype=1):
    return torch.full(_ints(shape), value, dtype=_dtype(dtype))


def onnx_tile(x, repeats):
    return x.repeat(_ints(repeats))


def onnx_cumsum(x, axis, exclusive=0, reverse=0):
    dim = int(axis.item())
    y = torch.flip(x, [dim]) if reverse else x
    y = torch.cumsum(y, dim)
    if exclusive:
        y = y - (torch.flip(x, [dim]) if reverse else x)
    return torch.flip(y, [dim]) if reverse else y


def onnx_trilu(x, k=None, upper=1):
    diagonal = int(k.item()) if k is not None else 0
    return torch.triu(x, diagonal) if upper else torch.tril(x, diagonal)


# -- convolution and pooling ------------------------------------------------------------------------------
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


def onnx_conv(x, w, b=None, group=1, pads=None, strides=None, dilations=None, auto_pad="NOTSET", kernel_shape=None):
    spatial = x.dim() - 2
    strides = strides or [1] * spatial
    dilations = dilations or [1] * spatial
    x, padding = _padded(x, _pads(x, list(w.shape[2:]), strides, dilations, pads, auto_pad))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return conv(x, w, b, strides, padding, dilations, group)


def onnx_conv_transpose(x, w, b=None, group=1, pads=None, strides=None, dilations=None, output_padding=None,
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


def onnx_max_pool(x, kernel_shape, pads=None, strides=None, dilations=None, ceil_mode=0, auto_pad="NOTSET",
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


def onnx_avg_pool(x, kernel_shape, pads=None, strides=None, ceil_mode=0, count_include_pad=0, auto_pad="NOTSET",
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


def onnx_global_avg_pool(x):
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def onnx_global_max_pool(x):
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


def onnx_lp_pool(x, kernel_shape, p=2, pads=None, strides=None, ceil_mode=0, auto_pad="NOTSET", dilations=None):
    spatial = x.dim() - 2
    strides = strides or [1] * spatial
    x, padding = _padded(x, _pads(x, kernel_shape, strides, [1] * spatial, pads, auto_pad))
    x = F.pad(x, [q for v in reversed(padding) for q in (v, v)]) if any(padding) else x
    pool = {1: F.lp_pool1d, 2: F.lp_pool2d, 3: F.lp_pool3d}[spatial]
    return pool(x, float(p), kernel_shape, strides, ceil_mode=bool(ceil_mode))


def onnx_global_lp_pool(x, p=2):
    return x.abs().pow(p).sum(dim=tuple(range(2, x.dim())), keepdim=True).pow(1.0 / p)


def onnx_pad(x, pads, value=None, axes=None, mode="constant"):
    pads = _ints(pads)
    rank = x.dim()
    axes = _ints(axes) if axes is not None else list(range(rank))
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


def onnx_resize(x, roi=None, scales=None, sizes=None, mode="nearest", coordinate_transformation_mode="half_pixel",
                nearest_mode="round_prefer_floor", cubic_coeff_a=-0.75, exclude_outside=0, extrapolation_value=0.0,
                antialias=0, axes=None, keep_aspect_ratio_policy="stretch"):
    rank = x.dim()
    chosen = [a % rank for a in axes] if axes else list(range(rank))
    if sizes is not None and sizes.numel():
        size, factor = list(x.shape), None
        for axis, value in zip(chosen, _ints(sizes), strict=True):
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


# -- reductions --------------------------------------------------------------------------------------------
def onnx_reduce(x, axes_input=None, op="ReduceSum", axes=None, keepdims=1, noop_with_empty_axes=0):
    axes = _ints(axes_input) if axes_input is not None else axes
    if not axes:
        if noop_with_empty_axes:
            return x
        axes = list(range(x.dim()))
    dims = tuple(a % x.dim() for a in axes)
    keep = bool(keepdims)
    if op == "ReduceMean":
        return x.mean(dim=dims, keepdim=keep)
    if op == "ReduceSum":
        return x.sum(dim=dims, keepdim=keep)
    if op == "ReduceMax":
        return x.amax(dim=dims, keepdim=keep)
    if op == "ReduceMin":
        return x.amin(dim=dims, keepdim=keep)
    if op == "ReduceProd":
        for d in sorted(dims, reverse=True):
            x = x.prod(dim=d, keepdim=keep)
        return x
    if op == "ReduceL1":
        return x.abs().sum(dim=dims, keepdim=keep)
    if op == "ReduceL2":
        return x.pow(2).sum(dim=dims, keepdim=keep).sqrt()
    if op == "ReduceSumSquare":
        return x.pow(2).sum(dim=dims, keepdim=keep)
    if op == "ReduceLogSum":
        return x.sum(dim=dims, keepdim=keep).log()
    return torch.logsumexp(x, dim=dims, keepdim=keep)


UNARY = {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp, "Log": torch.log,
    "Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal, "Neg": torch.neg, "Abs": torch.abs, "Sin": torch.sin,
    "Cos": torch.cos, "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sign": torch.sign,
    "Erf": torch.erf, "Softplus": F.softplus, "Softsign": F.softsign, "Not": torch.logical_not,
    "IsNaN": torch.isnan, "Mish": F.mish, "HardSwish": F.hardswish,
}
BINARY = {
    "Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Equal": torch.eq, "Less": torch.lt,
    "LessOrEqual": torch.le, "Greater": torch.gt, "GreaterOrEqual": torch.ge, "And": torch.logical_and,
    "Or": torch.logical_or, "Xor": torch.logical_xor,
}


def _binary(fn: Callable) -> Callable:
    def lowered(a, b):
        return fn(a, b)
    lowered.__name__ = f"onnx_{getattr(fn, '__name__', 'op')}"
    return lowered


#: op type -> lowering function. Inputs are passed positionally (None for an absent optional one),
#: attributes as keywords; see `_attributes` for the few renamed ones.
LOWERINGS: dict[str, Callable] = {
    **{op: _unary(fn) for op, fn in UNARY.items()},
    **{op: _binary(fn) for op, fn in BINARY.items()},
    "Div": onnx_div, "Pow": onnx_pow, "Clip": onnx_clip, "Gelu": onnx_gelu, "LeakyRelu": onnx_leaky_relu,
    "Elu": onnx_elu, "Celu": onnx_celu, "Selu": onnx_selu, "HardSigmoid": onnx_hard_sigmoid,
    "ThresholdedRelu": onnx_thresholded_relu, "PRelu": onnx_prelu, "IsInf": onnx_is_inf, "Cast": onnx_cast,
    "CastLike": onnx_cast_like, "Where": onnx_where, "Identity": onnx_identity, "Dropout": onnx_identity,
    "Max": onnx_variadic, "Min": onnx_variadic, "Sum": onnx_variadic, "Mean": onnx_variadic,
    "Gemm": onnx_gemm, "MatMul": onnx_matmul, "BatchNormalization": onnx_batch_norm,
    "LayerNormalization": onnx_layer_norm, "InstanceNormalization": onnx_instance_norm,
    "RMSNormalization": onnx_rms_norm, "SimplifiedLayerNormalization": onnx_rms_norm,
    "Attention": onnx_attention, "RotaryEmbedding": onnx_rotary_embedding,
    "GroupNormalization": onnx_group_norm, "Softmax": onnx_softmax, "LogSoftmax": onnx_log_softmax,
    "Concat": onnx_concat, "Split": onnx_split, "Slice": onnx_slice, "Transpose": onnx_transpose,
    "Unsqueeze": onnx_unsqueeze, "Squeeze": onnx_squeeze, "Flatten": onnx_flatten, "Reshape": onnx_reshape,
    "Expand": onnx_expand, "Shape": onnx_shape, "Gather": onnx_gather, "GatherElements": onnx_gather_elements,
    "GatherND": onnx_gather_nd, "Range": onnx_range, "ConstantOfShape": onnx_constant_of_shape,
    "Tile": onnx_tile, "CumSum": onnx_cumsum, "Trilu": onnx_trilu,
    "Conv": onnx_conv, "ConvTranspose": onnx_conv_transpose, "MaxPool": onnx_max_pool,
    "AveragePool": onnx_avg_pool, "GlobalAveragePool": onnx_global_avg_pool,
    "GlobalMaxPool": onnx_global_max_pool, "GlobalLpPool": onnx_global_lp_pool, "LpPool": onnx_lp_pool, "Pad": onnx_pad,
    "Resize": onnx_resize,
    **{op: onnx_reduce for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                                  "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp")},
}


#: com.microsoft ops (what ONNX Runtime's transformer optimizer fuses) -> lowering function
CONTRIB_LOWERINGS: dict[str, Callable] = {
    "SkipLayerNormalization": ms_skip_layer_norm, "SkipSimplifiedLayerNormalization": ms_skip_simplified_layer_norm,
    "BiasGelu": ms_bias_gelu, "FastGelu": ms_fast_gelu, "Gelu": ms_bias_gelu, "QuickGelu": ms_quick_gelu,
    "Attention": ms_attention, "MultiHeadAttention": ms_multi_head_attention,
    "GroupQueryAttention": ms_group_query_attention, "EmbedLayerNormalization": ms_embed_layer_norm,
}

#: ops whose lowering returns a tuple, one entry per ONNX output
MULTI_OUTPUT = frozenset({"Split", "MaxPool", "Attention", "SkipLayerNormalization",
                          "SkipSimplifiedLayerNormalization", "MultiHeadAttention", "GroupQueryAttention",
                          "EmbedLayerNormalization"})


def _attributes(node: gs.Node, opset: int) -> dict:
    """ONNX attributes as plain keyword values for the lowering function."""
    attrs = {}
    for key, value in node.attrs.items():
        if isinstance(value, gs.Constant | np.ndarray):
            array = np.asarray(getattr(value, "values", value))
            if key == "value" and node.op == "ConstantOfShape":
                attrs["dtype"] = int(onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
                value = array.reshape(-1)[0].item()
            else:
                value = array.tolist()
        elif isinstance(value, gs.Graph):
            raise LoweringError(f"{node.op} node '{node.name}' holds a subgraph: control flow is not supported")
        elif isinstance(value, bytes):
            value = value.decode()
        elif key == "to" and not isinstance(value, int):  # Cast's target type given as a numpy dtype
            value = int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(value)))
        attrs[key] = value
    if node.op in ("Max", "Min", "Sum", "Mean") or node.op.startswith("Reduce"):
        attrs["op"] = node.op
    if node.op in ("Softmax", "LogSoftmax"):
        attrs["opset"] = opset
        attrs.setdefault("axis", -1 if opset >= 13 else 1)
    if node.op == "Split":
        if "split" in attrs:
            attrs["split_attr"] = attrs.pop("split")
        attrs["outputs"] = len(node.outputs)
    return attrs


def _keyword_inputs(op: str) -> dict[int, str]:
    """Inputs that have an attribute twin in older opsets are passed under their own keyword."""
    return {"Unsqueeze": {1: "axes_input"}, "Squeeze": {1: "axes_input"}}.get(
        op, {1: "axes_input"} if op.startswith("Reduce") else {})


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
        value = torch.from_numpy(np.array(const.values))
        if value.is_floating_point() and value.ndim > 0 and id(const) not in exponents:
            root.register_parameter(attr, nn.Parameter(value))
        else:
            root.register_buffer(attr, value)
    for tensor in model.graph.inputs:
        if tensor.name not in names:
            env[tensor.name] = graph.placeholder(_identifier(tensor.name))
    opset = model.graph.opset
    for node in model.graph.nodes:
        fn = LOWERINGS.get(node.op) if (node.domain or "") in ("", "ai.onnx") else \
            CONTRIB_LOWERINGS.get(node.op) if node.domain == "com.microsoft" else None
        if fn is None:
            raise LoweringError(f"cannot lower {node.op} (node '{node.name or '(unnamed)'}'): no lowering rule")
        args, kwargs = [], _attributes(node, opset)
        keywords = _keyword_inputs(node.op)
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
        if node.op in MULTI_OUTPUT:
            for i, tensor in enumerate(node.outputs):
                if tensor.name:
                    env[tensor.name] = graph.call_function(operator.getitem, (result, i))
        else:
            env[node.outputs[0].name] = result  # Dropout's mask and similar extra outputs are not lowered
    results = [env[t.name] if t.name in env else graph.get_attr(names[t.name]) for t in model.graph.outputs]
    graph.output(results[0] if len(results) == 1 else tuple(results))
    module = fx.GraphModule(root, graph)
    module.onnx_names = {v: k for k, v in names.items()}  # attribute -> initializer name
    return module


def _identifier(name: str) -> str:
    cleaned = "".join(c if c.isalnum() else "_" for c in name)
    return cleaned if cleaned and not cleaned[0].isdigit() else f"input_{cleaned}"


def parameter_names(module: fx.GraphModule) -> dict[str, str]:
    """Parameter attribute -> ONNX initializer name."""
    return {attr: name for attr, name in module.onnx_names.items()
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
