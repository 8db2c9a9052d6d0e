"""`graphprune sweep`: one pruned, verified model per ratio, a table, JSON/CSV and a latency-vs-fidelity PNG."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import graphprune
from graphprune.testing import check_png
from graphprune.tools.cli import main


def test_sweep_minilm_four_ratios(minilm_paths, tmp_path, capsys) -> None:
    from graphprune.models.minilm import english_sentences, tokenize

    calib = tmp_path / "calib.npz"
    np.savez(calib, **tokenize(list(english_sentences()[:8]), seq=32))
    out = tmp_path / "sweep"
    assert main(["sweep", str(minilm_paths["dynamo"]), "--ratios", "0.2,0.4,0.6,0.8", "--calib", str(calib),
                 "--out", str(out), "--batch", "2", "--runs", "2", "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    assert "graphprune sweep" in text and "ratio-80.onnx" in text
    points = json.loads((out / "sweep.json").read_text())
    assert [p["ratio"] for p in points] == [0.0, 0.2, 0.4, 0.6, 0.8]
    params = [p["params"] for p in points]
    assert params == sorted(params, reverse=True) and len(set(params)) == 5
    assert points[0]["cosine"] == pytest.approx(1.0) and points[0]["speedup"] == 1.0
    assert all(0 < p["cosine"] < 1 for p in points[1:]) and points[-1]["cosine"] < points[1]["cosine"]
    assert all(p["latency_ms"] > 0 and p["top1_agreement"] is None for p in points)  # token states: no classes
    for p in points[1:]:
        assert graphprune.load_model(p["path"]).param_count() == p["params"]
    with open(out / "sweep.csv") as handle:
        assert [float(r["ratio"]) for r in csv.DictReader(handle)] == [0.0, 0.2, 0.4, 0.6, 0.8]
    check_png(out / "sweep.png")


def test_sweep_classifier_reports_top1_and_refuses_bad_ratios(tmp_path, capsys) -> None:
    from graphprune.models.digits import DigitsCNN

    net = DigitsCNN()
    path = graphprune.save_model(graphprune.from_torch(net, net.example_inputs(), input_names=["image"],
                                                       dynamic_batch=True), tmp_path / "cnn.onnx")
    out = tmp_path / "s"
    assert main(["sweep", str(path), "--ratios", "0.5,0.25", "--out", str(out), "--runs", "2", "--repeats", "1",
                 "--importance", "activation", "--calib", "random"]) == 0
    points = json.loads((out / "sweep.json").read_text())
    assert [p["ratio"] for p in points] == [0.0, 0.25, 0.5]
    assert points[0]["top1_agreement"] == 1.0 and 0 <= points[2]["top1_agreement"] <= 1
    check_png(out / "sweep.png")
    for ratios, message in (("0.5,1.5", "fractions in (0, 1)"), ("a,b", "comma-separated fractions"),
                            ("0.5,0.5", "repeats")):
        assert main(["sweep", str(path), "--ratios", ratios, "--out", str(tmp_path / "bad")]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
