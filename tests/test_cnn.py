"""Convolutional networks: every builder in models/cnn.py prunes into a verified, smaller model,
loses exactly its dead channels under `--threshold 0`, and `inspect` explains what is frozen."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import graphprune
from graphprune import runtime
from graphprune.models.cnn import CNN_BUILDERS, build
from graphprune.testing import check_dead_unit_removal, check_lowering
from graphprune.tools.cli import main

NAMES = sorted(CNN_BUILDERS)


@pytest.fixture(scope="session")
def cnn_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each builder exported once per session (dynamic batch, input 'x')."""
    folder = tmp_path_factory.mktemp("cnn")
    paths = {}
    for name in NAMES:
        net = build(name)
        model = graphprune.from_torch(net, net.example_inputs(), input_names=["x"], dynamic_batch=True)
        paths[name] = graphprune.save_model(model, folder / f"{name}.onnx")
    return paths


@pytest.mark.parametrize("ratio", ["0.3", "0.5"])
@pytest.mark.parametrize("name", NAMES)
def test_prune_gives_a_smaller_verified_model(cnn_paths, tmp_path, capsys, name: str, ratio: str) -> None:
    out, report_path = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main(["prune", str(cnn_paths[name]), "-o", str(out), "--ratio", ratio, "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["verified"] and report["params_after"] < report["params_before"]
    assert report["flops_after"] < report["flops_before"]
    dense, pruned = graphprune.load_model(cnn_paths[name]).to_onnx(), graphprune.load_model(out).to_onnx()
    feeds = runtime.sample_inputs(dense, dynamic_dim=3)
    assert [o.shape for o in runtime.run(pruned, feeds)] == [o.shape for o in runtime.run(dense, feeds)]


@pytest.mark.parametrize("name", NAMES)
def test_dead_channels_are_removed_exactly(cnn_paths, name: str) -> None:
    model = graphprune.load_model(cnn_paths[name])
    removed = check_dead_unit_removal(model, lambda group: set(range(1, group.units, 2)))
    assert removed > 0


@pytest.mark.parametrize("name", NAMES)
def test_inspect_lists_groups_and_frozen_reasons(cnn_paths, capsys, name: str) -> None:
    assert main(["inspect", str(cnn_paths[name]), "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert any(g["prunable"] for g in groups)
    assert all(g["frozen"] for g in groups if not g["prunable"] and g["units"] and g["units"] > 1)


def test_channel_shuffle_prunes_whole_shuffle_groups(cnn_paths) -> None:
    """[B, C] -> [B, g, C/g] -> transpose -> [B, C]: a shuffle group is g blocks of channels before
    the shuffle and a strided set after it; the other factor (channels within a group) is frozen."""
    model = graphprune.load_model(cnn_paths["shufflenet"])
    deps = graphprune.inspect(model)
    shuffled = [g for g in deps.prunable if any(m.repeats != 1 for m in g.members)]
    assert len(shuffled) == 1 and shuffled[0].units == 4  # ChannelShuffle(4) of 16 channels
    reasons = "; ".join(r for g in deps.groups for r in g.frozen)
    assert "Reshape" in reasons and "merges or splits" in reasons
    removed = check_dead_unit_removal(model, lambda g: {1} if g.id == shuffled[0].id else set())
    assert removed > 0


def test_grouped_convolution_keeps_whole_groups(cnn_paths) -> None:
    model = graphprune.load_model(cnn_paths["resnext"])
    groups_before = sorted(n.attrs["group"] for n in model.graph.nodes if n.op == "Conv")
    graphprune.prune(model, ratio=0.5)
    convs = [n for n in model.graph.nodes if n.op == "Conv" and n.attrs.get("group", 1) > 1]
    assert groups_before.count(4) == 2 and len(convs) == 2
    for conv in convs:
        weight = np.asarray(conv.inputs[1].values)
        assert conv.attrs["group"] == 2 and weight.shape[0] % 2 == 0
        assert weight.shape[1] * conv.attrs["group"] == conv.inputs[0].shape[1]


def test_flatten_into_linear_prunes_whole_channels(cnn_paths) -> None:
    model = graphprune.load_model(cnn_paths["vgg"])
    graphprune.prune(model, ratio=0.5)
    gemm = next(n for n in model.graph.nodes if n.op == "Gemm")
    conv = [n for n in model.graph.nodes if n.op == "Conv"][-1]
    channels = np.asarray(conv.inputs[1].values).shape[0]
    assert channels == 16 and np.asarray(gemm.inputs[1].values).shape[1] == channels * 4 * 4


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v2", "densenet", "se_net"])
def test_cli_threshold_zero_removes_dead_channels(cnn_paths, tmp_path, name: str) -> None:
    """Zero two channels of a group (filters, folded BN, consumers' input channels) in the file,
    then `graphprune prune --threshold 0` must drop exactly them and keep outputs identical."""
    model = graphprune.load_model(cnn_paths[name])
    consts = model.constants()
    group = next(g for g in graphprune.inspect(model).prunable
                 if g.exact and g.units >= 4 and all(m.tensor in consts for m in g.members if m.is_weight))
    dead, removed = (1, 3), 0
    for member in group.weights:
        values = np.asarray(consts[member.tensor].values).copy()
        index = [slice(None)] * values.ndim
        index[member.axis] = [member.start + u * member.unit_len + j for u in dead for j in range(member.unit_len)]
        values[tuple(index)] = 0
        consts[member.tensor].values = values
        removed += values.size // values.shape[member.axis] * len(dead) * member.unit_len
    dense_path, out = graphprune.save_model(model, tmp_path / "dead.onnx"), tmp_path / "out.onnx"
    assert main(["prune", str(dense_path), "-o", str(out), "--threshold", "0"]) == 0
    dense, pruned = graphprune.load_model(dense_path), graphprune.load_model(out)
    assert dense.param_count() - pruned.param_count() == removed
    feeds = runtime.sample_inputs(dense.to_onnx(), seed=5, dynamic_dim=4)
    for a, b in zip(runtime.run(pruned.to_onnx(), feeds), runtime.run(dense.to_onnx(), feeds), strict=True):
        assert np.max(np.abs(a - b)) <= 1e-5 * max(1.0, float(np.max(np.abs(b))))


@pytest.mark.parametrize("name", NAMES)
def test_lowered_module_matches_onnx_runtime(cnn_paths, name: str) -> None:
    check_lowering(graphprune.load_model(cnn_paths[name]))
