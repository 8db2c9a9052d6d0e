"""Determinism: the same input and options give byte-identical output, across processes with
different hash seeds (set and dict iteration orders that could leak into node or tensor order)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import graphprune
from graphprune.models.attention import ATTENTION_BUILDERS

OPTIONS = {
    "l2": ["--ratio", "0.5"],
    "obs-reconstruct": ["--ratio", "0.5", "--importance", "obs", "--calib", "random", "--reconstruct"],
}


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    net = ATTENTION_BUILDERS["bert"]()
    model = graphprune.from_torch(net, net.example_inputs(), input_names=net.input_names,
                                  dynamic_axes=net.dynamic_axes)
    return graphprune.save_model(model, tmp_path_factory.mktemp("det") / "bert.onnx")


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_same_input_and_options_give_identical_bytes(bert_path, tmp_path, name: str) -> None:
    outputs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"out-{hash_seed}.onnx"
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        subprocess.run([sys.executable, "-m", "graphprune", "-q", "prune", str(bert_path), "-o", str(out),
                        *OPTIONS[name]], check=True, env=env, capture_output=True)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) < bert_path.stat().st_size  # it did prune
