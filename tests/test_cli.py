"""The command line: prune summary, inspect (table and JSON), export, bench, demo."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import graphprune
from graphprune import runtime
from graphprune.tools.cli import main


def test_prune_prints_summary_and_writes_verified_model(trained_simple_net, tmp_path, capsys) -> None:
    out = tmp_path / "p.onnx"
    assert main(["prune", str(trained_simple_net.path), "-o", str(out), "--ratio", "0.5", "--round-to", "8"]) == 0
    text = capsys.readouterr().out
    assert "parameters" in text and "verified" in text and "MACs" in text
    pruned = graphprune.load_model(out)
    assert sorted(t.values.shape for t in pruned.weights()) == sorted([(16, 10), (16,), (10, 16), (10,)])
    onnx.checker.check_model(onnx.load(str(out)))
    (y,) = runtime.run(onnx.load(str(out)), {"x": np.ones((3, 10), np.float32)})
    assert y.shape == (3, 10)


def test_prune_with_pipeline_and_unstructured_together(trained_simple_net, tmp_path, capsys) -> None:
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main(["prune", str(trained_simple_net.path), "-o", str(out), "--ratio", "0.3", "--sparsity", "0.5",
                 "--importance", "l1", "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    names = [p["name"] for p in data["passes"]]
    assert names == ["unshare-constants", "analyze-deps", "score-importance", "prune-units", "sparsify-weights",
                     "cleanup-graph", "verify-model"]
    sparsify = data["passes"][4]["stats"]
    assert 0.49 < sparsify["sparsity"] < 0.51
    out2 = tmp_path / "q.onnx"
    assert main(["prune", str(trained_simple_net.path), "-o", str(out2), "--pipeline",
                 "deps,importance{kind=random,seed=1},prune{ratio=0.5},verify"]) == 0
    assert graphprune.load_model(out2).param_count() == 10 * 10 + 10 + 10 * 10 + 10


def test_inspect_table_and_json(trained_simple_net, capsys) -> None:
    assert main(["inspect", str(trained_simple_net.path)]) == 0
    table = capsys.readouterr().out
    assert "1 prunable of 3 weight groups" in table and "graph input 'x'" in table
    assert main(["inspect", str(trained_simple_net.path), "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert [(g["units"], g["prunable"]) for g in groups] == [(10, False), (20, True), (10, False)]
    assert groups[0]["frozen"] == ["graph input 'x'"]
    hidden = groups[1]
    assert {(m["tensor"], m["axis"]) for m in hidden["members"] if m["weight"]} == {
        ("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)}


def test_export_factory(tmp_path, capsys) -> None:
    out = tmp_path / "simple.onnx"
    assert main(["export", "graphprune.models.mlp:simple_net", "-o", str(out), "--dynamic-batch"]) == 0
    assert "430 parameters" in capsys.readouterr().out
    proto = onnx.load(str(out))
    assert [i.name for i in proto.graph.input] == ["x"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param


def test_export_bad_factory(tmp_path, capsys) -> None:
    assert main(["export", "graphprune.models.mlp:nope", "-o", str(tmp_path / "x.onnx")]) == 1
    assert "has no callable 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_bench_side_by_side(trained_simple_net, tmp_path, capsys) -> None:
    pruned = tmp_path / "p.onnx"
    main(["prune", str(trained_simple_net.path), "-o", str(pruned), "--ratio", "0.5"])
    capsys.readouterr()
    results, table = tmp_path / "bench.json", tmp_path / "bench.csv"
    assert main(["bench", str(trained_simple_net.path), str(pruned), "--runs", "5", "--batch", "4",
                 "--repeats", "2", "--json", str(results), "--csv", str(table)]) == 0
    rows = json.loads(results.read_text())
    assert [r["params"] for r in rows] == [430, 220]
    assert [r["macs"] for r in rows] == [4 * (10 * 20 + 20 * 10), 4 * (10 * 10 + 10 * 10)]  # batch 4
    for r in rows:
        assert r["batch"] == 4 and r["shapes"] == {"x": [4, 10]} and r["provider"] == "CPUExecutionProvider"
        assert 0 < r["latency_ms_median"] <= r["latency_ms_p90"] <= r["latency_ms_p99"]
        assert r["throughput"] == pytest.approx(4 / (r["latency_ms_median"] / 1e3))
        assert r["peak_memory_mb"] > 0 and len(r["speedup_rounds"]) == 2
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 0
    import csv

    with open(table) as handle:
        records = list(csv.DictReader(handle))
    assert [int(r["params"]) for r in records] == [430, 220] and records[0]["shapes"] == "x=4x10"
    assert float(records[1]["speedup_min"]) == pytest.approx(min(rows[1]["speedup_rounds"]))
    assert float(records[1]["speedup_max"]) == pytest.approx(max(rows[1]["speedup_rounds"]))
    assert "speedup" in capsys.readouterr().out


def test_bench_shapes_and_providers(trained_simple_net, tmp_path, capsys, caplog) -> None:
    path = str(trained_simple_net.path)
    out = tmp_path / "b.json"
    assert main(["bench", path, "--shape", "x=3x10", "--runs", "2", "--repeats", "1", "--no-memory",
                 "--provider", "cuda", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["shapes"] == {"x": [3, 10]} and row["peak_memory_mb"] is None
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert row["provider"] == "CPUExecutionProvider" and "running on CPU" in caplog.text
    for bad, message in ((["--shape", "x=3x9"], "does not fit the input's shape"),
                         (["--shape", "y=3x10"], "names no input"),
                         (["--shape", "x=3xa"], "whole numbers"),
                         (["--repeats", "0"], "--repeats must be at least 1")):
        assert main(["bench", path, "--runs", "1", "--no-memory", *bad]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert main(["bench", str(tmp_path / "missing.onnx")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_minilm_demo_runs_end_to_end(tmp_path, monkeypatch, capsys) -> None:
    from graphprune.tools import demo

    original = demo.run_minilm_demo
    monkeypatch.setattr(demo, "run_minilm_demo",
                        lambda out, console: original(out, console, bench_runs=2, sentences=16, seq=32))
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    text = capsys.readouterr().out
    assert "all-MiniLM-L6-v2" in text and "speedup" in text
    summary = json.loads((tmp_path / "demo" / "report.json").read_text())
    dense, quarter, half = summary["dense"], summary["heads+FFN -25%"], summary["heads+FFN -50%"]
    magnitude = summary["magnitude only -50%"]
    assert dense["params"] == 22_565_379 and dense["cosine_to_dense"] > 0.999
    assert dense["params"] > quarter["params"] > half["params"] == magnitude["params"]
    assert half["report"]["verified"] and quarter["report"]["verified"]
    assert 0 < half["cosine_to_dense"] < quarter["cosine_to_dense"] < 1
    # obs + reconstruct at a uniform ratio: one sequential pass that refits every pruned layer
    refit = next(p["stats"] for p in half["report"]["passes"] if p["name"] == "prune-sequential")
    assert refit["layers_refit"] == 12  # 6 attention output and 6 FFN down projections
    assert not any("layers_refit" in p["stats"] for p in magnitude["report"]["passes"])
    for name in ("dense.onnx", "pruned-25.onnx", "pruned-50.onnx", "pruned-50-magnitude.onnx"):
        onnx.checker.check_model(str(tmp_path / "demo" / name))


def test_digits_demo_runs_end_to_end(tmp_path, monkeypatch, capsys) -> None:
    from graphprune.tools import demo

    original = demo.run_digits_demo
    monkeypatch.setattr(demo, "run_digits_demo", lambda out, console: original(out, console, epochs=4, bench_runs=3))
    assert main(["demo", "--model", "digits", "--out", str(tmp_path / "demo")]) == 0
    text = capsys.readouterr().out
    assert "DigitsCNN" in text and "speedup" in text
    summary = json.loads((tmp_path / "demo" / "report.json").read_text())
    dense, half, l2 = summary["dense"], summary["Taylor -50%"], summary["magnitude (L2) -50%"]
    assert dense["accuracy"] > 0.9  # 4 epochs on digits already learn the task
    assert half["params"] < 0.35 * dense["params"] and half["report"]["verified"]
    assert half["params"] == l2["params"] and half["accuracy"] > l2["accuracy"]
    assert summary["weights 50% zero"]["params"] == dense["params"]
    for name in ("dense.onnx", "pruned-25.onnx", "pruned-50.onnx", "pruned-50-l2.onnx", "sparse-50.onnx"):
        onnx.checker.check_model(onnx.load(str(tmp_path / "demo" / name)))


def test_inspect_dry_run_and_costs(trained_simple_net, capsys) -> None:
    before = trained_simple_net.path.read_bytes()
    assert main(["inspect", str(trained_simple_net.path), "--ratio", "0.3", "--round-to", "4", "--costs",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(g["units"], g["kept"]) for g in data["groups"]] == [(10, 10), (20, 16), (10, 10)]
    assert [(n["op"], n["params"], n["macs"]) for n in data["nodes"]] == [("Gemm", 220, 200), ("Relu", 0, 0),
                                                                         ("Gemm", 210, 200)]
    assert trained_simple_net.path.read_bytes() == before


def test_export_errors_are_one_line_for_both_exporters(tmp_path, monkeypatch, capsys) -> None:
    """An op the TorchScript exporter cannot convert: one line, no IR dump, no file."""
    (tmp_path / "mha_factory.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a = torch.nn.MultiheadAttention(16, 2, batch_first=True)\n"
        "    def forward(self, x):\n"
        "        return self.a(x, x, x, need_weights=False)[0]\n"
        "def build():\n"
        "    return M().eval(), (torch.randn(2, 4, 16),)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "m.onnx"
    assert main(["export", "mha_factory:build", "-o", str(out), "--exporter", "torchscript"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torchscript" in err and "not supported" in err
    assert not out.exists()
    assert main(["export", "mha_factory:build", "-o", str(out), "--dynamic-axes", "0,x"]) == 1
    assert "--dynamic-axes wants comma-separated integers" in capsys.readouterr().err
    assert main(["export", "mha_factory:build", "-o", str(out), "--dynamic-axes", "0,1"]) == 0
    assert graphprune.load_model(out).graph.inputs[0].shape[:2] == ["batch", "seq"]


def test_verbose_logs_steps_and_quiet_turns_progress_off(trained_simple_net, tmp_path, caplog) -> None:
    import logging

    from graphprune.tools import progress

    out = str(tmp_path / "p.onnx")
    try:
        assert main(["-v", "-q", "prune", str(trained_simple_net.path), "-o", out, "--ratio", "0.5", "--calib",
                     "random", "--reconstruct"]) == 0
        assert not progress.ENABLED
        assert "reconstruct 1/1" in caplog.text and "pruned 10 units" in caplog.text
        caplog.clear()
        assert main(["prune", str(trained_simple_net.path), "-o", out, "--ratio", "0.5"]) == 0
        assert progress.ENABLED and not [r for r in caplog.records if r.levelno < logging.WARNING]
    finally:
        progress.ENABLED = True
        logging.getLogger("graphprune").setLevel(logging.NOTSET)


def test_bench_minilm_pair_and_cnn_pair(minilm_paths, tmp_path) -> None:
    from graphprune.models.digits import DigitsCNN

    net = DigitsCNN()
    cnn = graphprune.save_model(graphprune.from_torch(net, net.example_inputs(), input_names=["image"],
                                                      dynamic_batch=True), tmp_path / "cnn.onnx")
    pairs = {"minilm": (minilm_paths["dynamo"], ["--batch", "2", "--seq", "16"]),
             "cnn": (cnn, ["--shape", "image=8x1x8x8"])}
    for name, (dense, shape) in pairs.items():
        pruned = tmp_path / f"{name}-half.onnx"
        assert main(["prune", str(dense), "-o", str(pruned), "--ratio", "0.5"]) == 0
        out = tmp_path / f"{name}.json"
        assert main(["bench", str(dense), str(pruned), "--runs", "3", "--repeats", "2", "--no-memory",
                     "--json", str(out), *shape]) == 0
        first, second = json.loads(out.read_text())
        assert first["params"] > second["params"] and first["macs"] > 1.5 * second["macs"]
        assert first["shapes"] == second["shapes"] and second["speedup"] > 0


def test_a_missing_extra_is_named(trained_simple_net, tmp_path) -> None:
    """Without torch (blocked here as if it were not installed), an ONNX file still prunes by L2,
    and a criterion that needs torch says which extra to install, in one line."""
    import subprocess
    import sys

    run = ("import sys; sys.modules['torch'] = None; from graphprune.tools.cli import main; "
           "sys.exit(main(sys.argv[1:]))")
    source, out = str(trained_simple_net.path), str(tmp_path / "p.onnx")
    plain = subprocess.run([sys.executable, "-c", run, "-q", "prune", source, "-o", out, "--ratio", "0.5"],
                           capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr[-500:]
    taylor = subprocess.run([sys.executable, "-c", run, "-q", "prune", source, "-o", out, "--ratio", "0.5",
                             "--importance", "taylor"], capture_output=True, text=True)
    assert taylor.returncode == 1
    assert taylor.stderr.strip() == ("graphprune: error: this needs torch, which is not installed: "
                                     "pip install 'graphprune[torch]'")
    demo = subprocess.run([sys.executable, "-c", run, "-q", "demo", "--out", str(tmp_path / "demo")],
                          capture_output=True, text=True)
    assert demo.returncode == 1
    assert demo.stderr.strip() == ("graphprune: error: this needs torch, which is not installed: "
                                   "pip install 'graphprune[demo]'")
