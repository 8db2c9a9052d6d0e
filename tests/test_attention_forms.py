"""Attention outside transformers' models: torch.nn.MultiheadAttention (packed in_proj_weight,
batch_first both ways) and torchvision's ViT and Swin. Every layer's heads are prunable and cut,
pruned models verify at other batch sizes, and dead heads are removed exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import graphprune
from graphprune import api, runtime
from graphprune.analysis.deps import analyze
from graphprune.ir.model import unshare_constants
from graphprune.models.attention import MODULE_BUILDERS
from graphprune.testing import check_dead_unit_removal
from graphprune.tools.cli import main

#: (exporter, dynamic axes?). TorchScript traces `batch * num_heads` of nn.MultiheadAttention into a
#: constant (its export only runs at the traced batch), so it is exported with static shapes;
#: batch_first nn.TransformerEncoderLayer and torchvision's ViT do not export with TorchScript at
#: all (eval mode takes the fused fast path, `_transformer_encoder_layer_fwd` and
#: `_native_multi_head_attention`, which have no TorchScript symbolic). Swin's TorchScript graph
#: pads windows by sizes computed at run time: only the dynamo export (the default) is covered.
NO_TORCHSCRIPT = ("torch_encoder", "torchvision_vit", "torchvision_swin")
VARIANTS = {"dynamo-dynamic": ("dynamo", True), "dynamo-static": ("dynamo", False),
            "torchscript-static": ("torchscript", False)}
CASES = [(name, variant) for name in sorted(MODULE_BUILDERS) for variant in VARIANTS
         if not (name in NO_TORCHSCRIPT and variant.startswith("torchscript"))]
#: heads per attention layer
HEADS = {"torch_encoder": [4, 4], "torch_encoder_seq_first": [4, 4], "torchvision_vit": [4, 4],
         "torchvision_swin": [2, 2, 4, 4]}


@pytest.fixture(scope="session")
def module_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    folder = tmp_path_factory.mktemp("attention-forms")
    paths = {}
    for name, variant in CASES:
        exporter, dynamic = VARIANTS[variant]
        net = MODULE_BUILDERS[name]()
        model = graphprune.from_torch(net, net.example_inputs(), input_names=net.input_names,
                                      dynamic_axes=net.dynamic_axes if dynamic else None, exporter=exporter)
        paths[(name, variant)] = graphprune.save_model(model, folder / f"{name}-{variant}.onnx")
    return paths


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_every_layer_loses_heads(module_paths, tmp_path, name: str, variant: str) -> None:
    path = module_paths[(name, variant)]
    heads = [g for g in api.inspect(graphprune.load_model(path)).prunable if g.kind == "head"]
    assert sorted(g.units for g in heads) == HEADS[name]
    out, report_path = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main(["prune", str(path), "-o", str(out), "--ratio", "0.5", "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["verified"]
    cut = sorted((g["units_before"], g["units_after"]) for g in report["groups"] if g["kind"] == "head")
    assert cut == sorted((units, units // 2) for units in HEADS[name])
    dense, pruned = graphprune.load_model(path).to_onnx(), graphprune.load_model(out).to_onnx()
    feeds = runtime.sample_inputs(dense, dynamic_dim=3)  # batch 3 where the export is dynamic
    assert [o.shape for o in runtime.run(pruned, feeds)] == [o.shape for o in runtime.run(dense, feeds)]


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_dead_heads_are_removed_exactly(module_paths, name: str, variant: str) -> None:
    """Zero one head per layer (its Q, K and V rows of the packed projection, biases, output
    columns; Swin: its relative position bias too) and every other FFN neuron: `--threshold 0`
    removes exactly those, outputs unchanged."""
    model = graphprune.load_model(module_paths[(name, variant)])
    seen = []

    def choose(group) -> set[int]:
        if not group.exact:
            return set()
        if group.kind == "head":
            seen.append(group.id)
            return {len(seen) % group.units}
        return set(range(0, group.units, 2)) if group.kind == "neuron" and group.units > 8 else set()

    assert check_dead_unit_removal(model, choose) > 0
    assert len(seen) == len(HEADS[name])


def test_swin_relative_position_bias_goes_with_its_heads(module_paths, tmp_path) -> None:
    """Each Swin block's per-head bias [1, heads, N, N] (folded from the table by the exporter) is a
    member of the head group and loses the pruned heads' planes; shifted windows still match."""
    path = module_paths[("torchvision_swin", "dynamo-dynamic")]
    model = graphprune.load_model(path)
    unshare_constants(model)  # as the analysis sees it: every reader of a shared constant has its own
    model.infer_shapes()
    heads = [g for g in analyze(model).prunable if g.kind == "head"]
    consts = model.constants()
    biases = [m for g in heads for m in g.weights if consts[m.tensor].values.ndim == 4]
    assert len(biases) == len(heads)
    out = tmp_path / "p.onnx"
    assert main(["prune", str(path), "-o", str(out), "--ratio", "0.5"]) == 0
    pruned = graphprune.load_model(out)
    shapes = sorted(t.values.shape[1] for t in pruned.weights() if t.values.ndim == 4 and t.values.shape[0] == 1
                    and t.values.shape[2] == t.values.shape[3])
    assert shapes == [1, 1, 2, 2]
    feeds = runtime.sample_inputs(model.to_onnx(), dynamic_dim=3)
    assert np.isfinite(runtime.run(pruned.to_onnx(), feeds)[0]).all()
