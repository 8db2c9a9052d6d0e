"""Causal language models: a pruned model is never bigger than its input (tied embeddings stay
tied)."""

from __future__ import annotations

import json

import onnx_graphsurgeon as gs

import graphprune
from graphprune.cli import main
from graphprune.models.attention import llama_lm


def test_a_tied_lm_head_stays_tied_and_the_pruned_model_is_smaller(tmp_path) -> None:
    """The dynamo exporter keeps a large tied LM head as Transpose(embedding); folding it would
    add a second 2 MiB table to a pruned model."""
    net = llama_lm(vocab=8192)
    model = graphprune.from_torch(net, net.example_inputs(), input_names=net.input_names,
                                  dynamic_axes=net.dynamic_axes, exporter="dynamo")
    dense = graphprune.save_model(model, tmp_path / "lm.onnx")
    table = next(n.inputs[0] for n in model.graph.nodes if n.op == "Transpose"
                 and isinstance(n.inputs[0], gs.Constant))
    assert table.values.shape == (8192, 64)
    out, report_path = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main(["prune", str(dense), "-o", str(out), "--ratio", "0.2", "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["verified"] and report["params_after"] < report["params_before"]
    assert out.stat().st_size < dense.stat().st_size
    pruned = graphprune.load_model(out)
    tables = [t for t in pruned.weights() if t.values.size == 8192 * 64]
    assert len(tables) == 1 and any(n.op == "Transpose" for n in tables[0].outputs)


def _scored_kind(report_path) -> str:
    report = json.loads(report_path.read_text())
    return next(p["stats"]["kind"] for p in report["passes"] if p["name"] == "score-importance")


def test_magnitude_on_a_language_model_warns_and_calibration_data_picks_a_calibrated_criterion(
        tmp_path, caplog) -> None:
    import numpy as np

    net = llama_lm()
    model = graphprune.from_torch(net, net.example_inputs(), input_names=net.input_names,
                                  dynamic_axes=net.dynamic_axes, exporter="dynamo")
    dense = graphprune.save_model(model, tmp_path / "lm.onnx")
    report_path = tmp_path / "r.json"
    assert main(["prune", str(dense), "-o", str(tmp_path / "a.onnx"), "--ratio", "0.2", "--report", str(report_path)]) == 0
    assert "magnitude importance on a language model" in caplog.text
    caplog.clear()
    assert _scored_kind(report_path) == "l2"
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=np.random.default_rng(0).integers(0, 100, (8, 8)), attention_mask=np.ones((8, 8), np.int64))
    assert main(["prune", str(dense), "-o", str(tmp_path / "b.onnx"), "--ratio", "0.2", "--calib", str(calib),
                 "--report", str(report_path)]) == 0
    assert "magnitude importance" not in caplog.text
    assert _scored_kind(report_path) == "activation"
