"""`prune --report-dir`: the report as JSON plus charts, for a transformer and a CNN."""

from __future__ import annotations

import json

import numpy as np
import pytest

import graphprune
from graphprune.models.attention import ATTENTION_BUILDERS
from graphprune.models.digits import DigitsCNN
from graphprune.testing import check_png
from graphprune.tools.cli import main


@pytest.mark.parametrize("name", ["bert", "cnn"])
def test_report_dir_writes_json_and_charts(tmp_path, capsys, name: str) -> None:
    net = ATTENTION_BUILDERS["bert"]() if name == "bert" else DigitsCNN()
    input_names = net.input_names
    model = graphprune.from_torch(net, net.example_inputs(), input_names=input_names, dynamic_batch=True)
    path = graphprune.save_model(model, tmp_path / f"{name}.onnx")
    folder = tmp_path / "report"
    assert main(["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.5", "--importance",
                 "activation", "--calib", "random", "--report-dir", str(folder)]) == 0
    assert "report charts" in capsys.readouterr().out
    report = json.loads((folder / "report.json").read_text())
    pruned = [g for g in report["groups"] if g["units_after"] < g["units_before"]]
    kinds = {g["kind"] for g in pruned}
    assert kinds == ({"head", "neuron"} if name == "bert" else {"channel", "neuron"})
    for group in pruned:
        assert group["label"] and len(group["scores"]) == group["units_before"]
        assert group["units_after"] == -(-group["units_before"] // 2)  # half kept, rounded up
        assert np.all(np.isfinite(group["scores"])) and max(group["scores"]) > 0
    check_png(folder / "units.png")
    check_png(folder / "importance.png")
