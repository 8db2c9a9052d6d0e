"""Importance criteria as registered scorers; an L2 prune never imports torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from graphprune.errors import PipelineError
from graphprune.importance import SCORERS, register_scorer, scorer_for
from graphprune.pipeline import make_pass, parse_pipeline

NO_TORCH = """
import sys
import numpy as np
from onnx import TensorProto, helper, numpy_helper
import graphprune
rng = np.random.default_rng(0)
weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
           for name, shape in (("w1", (8, 16)), ("w2", (16, 4)))]
graph = helper.make_graph(
    [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
     helper.make_node("MatMul", ["r", "w2"], ["y"])], "mlp",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], weights)
model = graphprune.Model.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
report = graphprune.prune(model, ratio=0.5, importance="l2")
assert report.verified and model.param_count() < 8 * 16 + 16 * 4
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
assert not heavy, heavy[:5]
"""


def test_an_l2_prune_does_not_import_torch() -> None:
    done = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-3:]


def test_importance_kinds_are_the_registered_scorers() -> None:
    from graphprune.tools.cli import CLI_IMPORTANCE

    assert {"l1", "l2", "random", "saliency", "activation", "wanda-sp", "flap", "taylor", "fisher", "obs"} == set(SCORERS)
    assert set(CLI_IMPORTANCE) == set(SCORERS) - {"saliency"}
    for unknown in (lambda: make_pass("importance", kind="snip"), lambda: parse_pipeline("importance{kind=snip}")):
        with pytest.raises(PipelineError, match="'snip' is not one of activation, fisher"):
            unknown()
    assert scorer_for("wanda-sp") is scorer_for("activation")
    assert scorer_for("fisher") is scorer_for("taylor")
    with pytest.raises(KeyError, match="no importance criterion 'snip'"):
        scorer_for("snip")
    with pytest.raises(ValueError, match="registered twice"):
        register_scorer(scorer_for("l2"))
