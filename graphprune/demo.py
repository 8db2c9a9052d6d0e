"""`graphprune demo`: the whole job on the bundled SimpleNet (train, export, prune two ways, verify)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from graphprune import api, frontend, runtime
from graphprune.ir import Model, load_model, save_model

TRAIN_SAMPLES = 512
TEST_SAMPLES = 256


def onnx_mse(model: Model, x: np.ndarray, y: np.ndarray) -> float:
    """Mean squared error of the ONNX model under ONNX Runtime."""
    proto = model.to_onnx()
    prediction = runtime.run(proto, {proto.graph.input[0].name: x})[0]
    return float(np.mean((prediction - y) ** 2))


def run_demo(out: Path, console: Console) -> dict:
    import torch

    from graphprune.models import SimpleNet, make_regression_data, train

    out.mkdir(parents=True, exist_ok=True)
    x, y = make_regression_data(TRAIN_SAMPLES + TEST_SAMPLES)
    x_train, y_train, x_test, y_test = x[:TRAIN_SAMPLES], y[:TRAIN_SAMPLES], x[TRAIN_SAMPLES:], y[TRAIN_SAMPLES:]
    torch.manual_seed(0)
    net = SimpleNet()
    with console.status("training SimpleNet (Linear 10->20, ReLU, Linear 20->10) on random data"):
        train_loss = train(net, x_train, y_train)
    console.print(f"trained SimpleNet: train MSE {train_loss:.4f}")

    with console.status("exporting with torch.onnx.export (dynamo)"):
        dense = frontend.from_torch(net, (x_train[:4],), input_names=["x"], dynamic_batch=True)
    dense_path = save_model(dense, out / "dense.onnx")
    x_np, y_np = x_test.numpy(), y_test.numpy()
    dense_loss = onnx_mse(load_model(dense_path), x_np, y_np)

    # (a) unstructured: |w| < eps -> 0
    eps = 0.05
    sparse = load_model(dense_path)
    sparse_report = api.prune(sparse, weight_threshold=eps)
    sparse_path = save_model(sparse, out / "sparse.onnx")
    sparsity = next(p.stats for p in sparse_report.passes if p.name == "sparsify-weights")["sparsity"]

    # (b) structural: hidden units scored by their Taylor contribution sum (dL/dw) * w, removed physically
    saliency = frontend.taylor_saliency(net, torch.nn.functional.mse_loss, [(x_train, y_train)])
    pruned = load_model(dense_path)
    pruned_report = api.prune(pruned, ratio=0.5, importance="saliency",
                              saliency=frontend.saliency_for(pruned, net, saliency))
    pruned_path = save_model(pruned, out / "pruned.onnx")
    hidden = next(g for g in pruned_report.groups if g["units_after"] != g["units_before"])

    table = Table(title="graphprune demo: SimpleNet, test MSE under ONNX Runtime")
    for column in ("model", "parameters", "MACs", "test MSE", "note"):
        table.add_column(column)
    table.add_row(dense_path.name, f"{dense.param_count():,}", f"{pruned_report.macs_before:,}",
                  f"{dense_loss:.4f}", "dense")
    table.add_row(sparse_path.name, f"{sparse.param_count():,}", f"{sparse_report.macs_after:,}",
                  f"{onnx_mse(sparse, x_np, y_np):.4f}", f"|w| < {eps} zeroed: sparsity {sparsity:.1%}")
    table.add_row(pruned_path.name, f"{pruned.param_count():,}", f"{pruned_report.macs_after:,}",
                  f"{onnx_mse(pruned, x_np, y_np):.4f}",
                  f"Taylor-scored hidden units {hidden['units_before']} -> {hidden['units_after']}")
    console.print(table)
    summary = {"dense": str(dense_path), "sparse": str(sparse_path), "pruned": str(pruned_path),
               "sparse_report": sparse_report.to_json(), "pruned_report": pruned_report.to_json()}
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    console.print(f"models and report.json written to {out}/; all verified (onnx.checker, ORT, output shapes)")
    return summary
