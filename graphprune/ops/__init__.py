"""Per-op knowledge, one module per op family; importing this package registers every op.

Each op is registered once (`registry.register`) with its dependency rule, rewrite fixup, torch
lowering and cost; `base` defines those four contracts and the helpers the families share. To
support a new op, add it to its family's module (see the README's "Contributing").
"""

from graphprune.ops import (  # noqa: F401 - importing a family registers its ops
    attention,
    control_flow,
    conv,
    elementwise,
    linear,
    norm,
    reduce,
    reshape,
    slicing,
)
from graphprune.ops.registry import REGISTRY, OpSpec, lookup, ops_tagged, register, spec_of, unscored_inputs

#: ops with a weight matrix or kernel as a constant input
WEIGHTED_OPS = ops_tagged("weighted")
#: weighted ops whose input channels calibrated criteria measure (MatMul, Gemm, Conv: ConvTranspose's
#: weight is laid out [in, out / group, ...] and is not one of them)
CALIBRATED_OPS = ops_tagged("calibrated")
REDUCE_OPS = ops_tagged("reduce")

__all__ = ["CALIBRATED_OPS", "REDUCE_OPS", "REGISTRY", "WEIGHTED_OPS", "OpSpec", "lookup", "ops_tagged", "register",
           "spec_of", "unscored_inputs"]
