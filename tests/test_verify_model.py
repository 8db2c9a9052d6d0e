"""verify-model: checks against the dense model; refuses a model that no longer runs."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

import graphprune
from graphprune.errors import VerificationError
from graphprune.pipeline import PassManager, parse_pipeline


def test_verify_reports_shapes_and_difference_to_dense(trained_simple_net) -> None:
    model = graphprune.load_model(trained_simple_net.path)
    report = graphprune.prune(model, "deps,prune{ratio=0.5},verify")
    stats = report.passes[-1].stats
    assert stats["output_shapes"] == [[2, 10]] and stats["max_output_diff"] > 0


def test_verify_without_the_manager_still_runs_the_model(trained_simple_net) -> None:
    model = graphprune.load_model(trained_simple_net.path)
    model.graph.nodes[-1].inputs[1] = gs.Constant("broken", np.ones((3, 3), np.float32))
    with pytest.raises(VerificationError, match="pass 'verify-model' failed"):
        PassManager(parse_pipeline("verify"), verify=False).run(model)
