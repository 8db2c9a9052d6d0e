"""Shared fixtures: models are trained and exported once per test session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import graphprune
from graphprune.models import SimpleNet, make_regression_data, train, zero_hidden_units

DEAD_UNITS = (1, 5, 7, 13)


@dataclass
class Trained:
    net: SimpleNet
    x: torch.Tensor
    y: torch.Tensor
    path: Path  # exported ONNX (dynamic batch, input "x")


@pytest.fixture(scope="session")
def trained_simple_net(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    x, y = make_regression_data(256)
    torch.manual_seed(0)
    net = SimpleNet()
    train(net, x, y, epochs=150)
    model = graphprune.from_torch(net, (x[:4],), input_names=["x"], dynamic_batch=True)
    path = tmp_path_factory.mktemp("simple") / "simple.onnx"
    graphprune.save_model(model, path)
    return Trained(net, x, y, path)


@pytest.fixture(scope="session")
def dead_mlp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SimpleNet with hidden units DEAD_UNITS zeroed (row, bias, consumer column), exported."""
    torch.manual_seed(1)
    net = SimpleNet()
    zero_hidden_units(net.fc1, net.fc2, DEAD_UNITS)
    model = graphprune.from_torch(net, net.example_inputs(), input_names=["x"], dynamic_batch=True)
    path = tmp_path_factory.mktemp("dead") / "dead_mlp.onnx"
    graphprune.save_model(model, path)
    return path


@pytest.fixture(scope="session")
def dead_units() -> tuple[int, ...]:
    return DEAD_UNITS


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def minilm_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real all-MiniLM-L6-v2 with eager attention, both exporters, dynamic batch and sequence;
    and "default*": `AutoModel.from_pretrained` as a user calls it (SDPA), exported by dynamo with
    dynamic and static shapes and by TorchScript."""

    from graphprune.models.minilm import english_sentences, export, load_encoder, tokenize

    folder = tmp_path_factory.mktemp("minilm")
    feeds = tokenize(list(english_sentences()[:2]), seq=16)
    encoder = load_encoder()
    paths = {exporter: graphprune.save_model(export(encoder, feeds, exporter), folder / f"minilm-{exporter}.onnx")
             for exporter in ("dynamo", "torchscript")}
    default = load_encoder("default")
    paths["default"] = graphprune.save_model(export(default, feeds), folder / "minilm-default.onnx")
    paths["default-static"] = graphprune.save_model(export(default, feeds, dynamic=False),
                                                    folder / "minilm-default-static.onnx")
    paths["default-torchscript"] = graphprune.save_model(export(default, feeds, "torchscript"),
                                                         folder / "minilm-default-torchscript.onnx")
    return paths


@pytest.fixture(scope="session")
def genai_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The onnxruntime-genai builder's export (GroupQueryAttention, KV cache) of a small random
    LLaMA; its Hugging Face folder (weights, tokenizer) is `../hf`."""
    from graphprune.models.genai import genai_export, llama_folder

    folder = tmp_path_factory.mktemp("genai")
    return genai_export(llama_folder(folder / "hf"), folder / "onnx")
