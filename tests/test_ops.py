"""The op registry: one entry per op with its rule, fixup, lowering and cost; no import cycles;
no torch until a lowering runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from graphprune import ops
from graphprune.ops.base import ELEMENTWISE, FREE

RULED = sorted((spec.domain, spec.op) for spec in ops.REGISTRY.values() if spec.rule is not None)


@pytest.mark.parametrize(("domain", "op"), RULED, ids=[f"{d or 'onnx'}:{o}" for d, o in RULED])
def test_every_op_with_a_rule_has_a_lowering_and_a_cost(domain: str, op: str) -> None:
    spec = ops.lookup(op, domain)
    assert spec.lowering is not None, f"{op} has a dependency rule but no lowering"
    assert callable(spec.cost) or spec.cost in (FREE, ELEMENTWISE), f"{op} has a dependency rule but no cost"


def test_an_op_is_registered_once() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        ops.register("MatMul", rule=None)
    with pytest.raises(ValueError, match="unknown domain"):
        ops.register("Frobnicate", "org.example")


def test_named_op_sets() -> None:
    assert ops.WEIGHTED_OPS == {"MatMul", "Gemm", "Conv", "ConvTranspose"}
    assert ops.CALIBRATED_OPS == {"MatMul", "Gemm", "Conv"}
    assert "ReduceMean" in ops.REDUCE_OPS and "ReduceLogSumExp" in ops.REDUCE_OPS
    assert ops.lookup("Gelu", "com.microsoft").lowering is not ops.lookup("Gelu").lowering
    assert ops.lookup("MatMul", "ai.onnx") is ops.lookup("MatMul", "")


def test_an_unregistered_op_freezes_and_control_flow_says_why() -> None:
    assert ops.lookup("Frobnicate") is None
    spec = ops.lookup("If")
    assert spec.rule is None and spec.lowering is None and "subgraph" in spec.note


@pytest.mark.parametrize("family", ["base", "registry", "elementwise", "linear", "norm", "reduce", "conv", "slicing",
                                    "reshape", "attention", "control_flow"])
def test_each_module_imports_on_its_own_without_torch(family: str) -> None:
    """A fresh interpreter imports one ops module first (an import cycle would fail here) and torch
    stays unimported: lowerings import it on first use."""
    code = (f"import sys, graphprune.ops.{family}; import graphprune.ops; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1:]


def test_a_lowering_imports_torch_on_first_use() -> None:
    import torch

    relu = ops.lookup("Relu").lowering
    assert torch.equal(relu(torch.tensor([-1.0, 2.0])), torch.tensor([0.0, 2.0]))
    assert ops.lookup("Add").lowering(torch.tensor([1]), torch.tensor([2])).item() == 3
