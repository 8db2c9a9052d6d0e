"""Matrix products: Gemm and MatMul (the weighted consumers of MLPs and transformers)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from graphprune.ops.base import (
    Couplings,
    RuleContext,
    broadcast,
    freeze_node,
    mark_contraction,
    node_label,
    numel,
    static_dims,
    torch,
)
from graphprune.ops.registry import register


def gemm(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Y[M,N] = A[M,K] @ B[K,N] + C, with transA/transB; B's N axis produces neurons."""
    a, b = node.inputs[0], node.inputs[1]
    y = node.outputs[0]
    trans_a, trans_b = node.attrs.get("transA", 0), node.attrs.get("transB", 0)
    a_m, a_k = (a.name, 1 if trans_a else 0), (a.name, 0 if trans_a else 1)
    b_k, b_n = (b.name, 1 if trans_b else 0), (b.name, 0 if trans_b else 1)
    out.couple(a_k, b_k)
    mark_contraction(node, out, a, b, a_k)
    out.couple(a_m, (y.name, 0))
    out.couple(b_n, (y.name, 1))
    if isinstance(b, gs.Constant):
        out.produced.setdefault(b_n, "neuron")
    if len(node.inputs) > 2 and node.inputs[2].name:
        broadcast(node, ctx, out, [node.inputs[2]], y)


def matmul(node: gs.Node, ctx: RuleContext, out: Couplings) -> None:
    """Numpy matmul: contraction axis couples A and B, batch axes broadcast."""
    a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
    rank_a, rank_b, rank_y = ctx.rank(a), ctx.rank(b), ctx.rank(y)
    if rank_a is None or rank_b is None or rank_y is None or rank_a < 2 or rank_b < 2:
        freeze_node(node, ctx, out, f"{node_label(node)}: vector or unknown-rank MatMul")
        return
    out.couple((a.name, rank_a - 1), (b.name, rank_b - 2))
    mark_contraction(node, out, a, b, (a.name, rank_a - 1))
    out.couple((a.name, rank_a - 2), (y.name, rank_y - 2))
    out.couple((b.name, rank_b - 1), (y.name, rank_y - 1))
    if isinstance(b, gs.Constant):
        out.produced.setdefault((b.name, rank_b - 1), "neuron")
    broadcast(node, ctx, out, [a, b], y, out_axes=list(range(rank_y - 2)))


def _gemm_macs(node: gs.Node) -> int:
    a = static_dims(node.inputs[0])
    if a is None or len(a) != 2:
        return 0
    k = a[0] if node.attrs.get("transA", 0) else a[1]
    return numel(node.outputs[0]) * k


def _matmul_macs(node: gs.Node) -> int:
    a = static_dims(node.inputs[0])
    return numel(node.outputs[0]) * a[-1] if a else 0


def lower_gemm(a, b, c=None, alpha=1.0, beta=1.0, transA=0, transB=0):  # noqa: N803
    a = a.t() if transA else a
    b = b.t() if transB else b
    y = alpha * (a @ b)
    return y if c is None else y + beta * c


def lower_matmul(a, b):
    return torch.matmul(a, b)


register("Gemm", rule=gemm, lowering=lower_gemm, cost=_gemm_macs, tags={"weighted", "calibrated"})
register("MatMul", rule=matmul, lowering=lower_matmul, cost=_matmul_macs, tags={"weighted", "calibrated"})
# INT8 forms from ONNX Runtime's quantizer: counted, never pruned through (no rule: they freeze)
register("MatMulInteger", cost=_matmul_macs)
register("QLinearMatMul", cost=_matmul_macs)
