"""torchvision architectures (random weights, exported by torch.onnx.export): prune at 0.3 and 0.5
into verified smaller models; `inspect` lists groups and frozen reasons without failing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

import graphprune
from graphprune.testing import check_lowering
from graphprune.tools.cli import main

MODELS = ("resnet18", "mobilenet_v2", "densenet121", "efficientnet_b0", "regnet_y_400mf")


@pytest.fixture(scope="session")
def torchvision_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each model exported once per session at 64x64 (the graphs are the same at any size)."""
    folder = tmp_path_factory.mktemp("torchvision")
    paths = {}
    for name in MODELS:
        torch.manual_seed(0)
        net = getattr(torchvision.models, name)(weights=None).eval()
        model = graphprune.from_torch(net, (torch.randn(1, 3, 64, 64),), input_names=["x"], dynamic_batch=True)
        paths[name] = graphprune.save_model(model, folder / f"{name}.onnx")
    return paths


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("name", MODELS)
def test_torchvision_models_prune_and_verify(torchvision_paths, name: str, ratio: float) -> None:
    model = graphprune.load_model(torchvision_paths[name])
    report = graphprune.prune(model, ratio=ratio)
    assert report.verified and report.params_after < report.params_before
    assert report.macs_after < report.macs_before
    # the largest group-wise cut is what was asked for (rounding only keeps more)
    cuts = [1 - g["units_after"] / g["units_before"] for g in report.groups if not g["frozen"]]
    assert cuts and max(cuts) <= ratio + 1e-9 and max(cuts) > ratio / 2


@pytest.mark.parametrize("name", MODELS)
def test_torchvision_inspect(torchvision_paths, capsys, name: str) -> None:
    assert main(["inspect", str(torchvision_paths[name]), "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    prunable = [g for g in groups if g["prunable"]]
    assert len(prunable) >= 10
    assert all(g["frozen"] for g in groups if not g["prunable"] and (g["units"] or 0) > 1)


@pytest.mark.parametrize("name", MODELS)
def test_lowered_module_matches_onnx_runtime(torchvision_paths, name: str) -> None:
    check_lowering(graphprune.load_model(torchvision_paths[name]), dynamic_dim=2)
