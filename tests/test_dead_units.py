"""Acceptance: `--threshold 0` removes exactly the dead hidden units, and outputs stay identical."""

from __future__ import annotations

import json

import numpy as np

import graphprune
from graphprune import runtime
from graphprune.tools.cli import main


def test_threshold_zero_removes_exactly_the_dead_units(dead_mlp_path, dead_units, tmp_path) -> None:
    out, report_path = tmp_path / "pruned.onnx", tmp_path / "report.json"
    code = main(["prune", str(dead_mlp_path), "-o", str(out), "--threshold", "0", "--report", str(report_path)])
    assert code == 0
    dense, pruned = graphprune.load_model(dead_mlp_path), graphprune.load_model(out)

    hidden = 20 - len(dead_units)
    assert sorted(np.asarray(t.values).shape for t in pruned.weights()) == sorted(
        [(hidden, 10), (hidden,), (10, hidden), (10,)])
    dead_params = len(dead_units) * (10 + 1 + 10)  # fc1 row + fc1 bias + fc2 column per unit
    assert dense.param_count() - pruned.param_count() == dead_params

    # the surviving weights are the live units, in order
    w1 = next(np.asarray(t.values) for t in dense.weights() if t.values.shape == (20, 10))
    live = [u for u in range(20) if u not in dead_units]
    assert any(np.array_equal(np.asarray(t.values), w1[live]) for t in pruned.weights())

    feeds = {"x": np.random.default_rng(3).standard_normal((16, 10)).astype(np.float32)}
    (before,) = runtime.run(dense.to_onnx(), feeds)
    (after,) = runtime.run(pruned.to_onnx(), feeds)
    assert after.shape == before.shape
    assert np.max(np.abs(after - before)) <= 1e-6

    report = json.loads(report_path.read_text())
    for key in ("params_before", "params_after", "flops_before", "flops_after", "groups", "passes", "verified"):
        assert key in report
    assert report["verified"] is True
    assert report["params_before"] - report["params_after"] == dead_params
    hidden_group = [g for g in report["groups"] if g["units_before"] != g["units_after"]]
    assert [(g["units_before"], g["units_after"]) for g in hidden_group] == [(20, hidden)]
    assert all({"id", "kind", "units_before", "units_after"} <= set(g) for g in report["groups"])
    assert all({"name", "seconds", "stats"} <= set(p) for p in report["passes"])


def test_threshold_zero_twice_changes_nothing(dead_mlp_path, tmp_path) -> None:
    model = graphprune.load_model(dead_mlp_path)
    graphprune.prune(model, threshold=0.0)
    params = model.param_count()
    report = graphprune.prune(model, threshold=0.0)
    assert report.params_after == params
    assert not next(p for p in report.passes if p.name == "prune-units").modified


def test_threshold_zero_keeps_units_that_are_only_partly_zero(tmp_path) -> None:
    import torch

    from graphprune.models import SimpleNet

    torch.manual_seed(2)
    net = SimpleNet()
    with torch.no_grad():
        net.fc1.weight[3] = 0.0
        net.fc1.bias[3] = 0.0  # unit 3 has a live consumer column: not dead by weights alone
    model = graphprune.from_torch(net, net.example_inputs(), input_names=["x"])
    report = graphprune.prune(model, threshold=0.0)
    assert report.params_after == report.params_before
