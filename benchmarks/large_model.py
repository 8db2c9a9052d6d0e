"""Check that a model with more than 2 GB of weights loads, prunes, verifies and saves (external data).

    python benchmarks/large_model.py [--hidden 32768] [--width 8192] [--out /tmp/gp-large]

Prints wall time and peak RSS of each stage. Not a unit test: it writes ~3.5 GB to disk.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

import graphprune
from graphprune.ir.model import Model


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def build(width: int, hidden: int) -> Model:
    rng = np.random.default_rng(0)
    x = gs.Variable("x", np.float32, ["N", width])
    w1 = gs.Constant("w1", (rng.standard_normal((width, hidden), np.float32) * 0.01))
    b1 = gs.Constant("b1", np.zeros(hidden, np.float32))
    w2 = gs.Constant("w2", (rng.standard_normal((hidden, width), np.float32) * 0.01))
    h, hb, r, y = (gs.Variable(n, np.float32) for n in ("h", "hb", "r", "y"))
    y.shape = ["N", width]
    nodes = [gs.Node("MatMul", "mm1", inputs=[x, w1], outputs=[h]), gs.Node("Add", "add", inputs=[h, b1], outputs=[hb]),
             gs.Node("Relu", "relu", inputs=[hb], outputs=[r]), gs.Node("MatMul", "mm2", inputs=[r, w2], outputs=[y])]
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=20)
    return Model(graph, ir_version=10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=34816)
    parser.add_argument("--out", type=Path, default=Path("/tmp/gp-large"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    start = time.perf_counter()
    model = build(args.width, args.hidden)
    dense = graphprune.save_model(model, args.out / "dense.onnx")
    del model
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"built + saved {size / 1e9:.2f} GB in {time.perf_counter() - start:.1f}s, peak RSS {peak_rss_gb():.1f} GB")
    assert (args.out / "dense.onnx.data").exists() and size > 2 ** 31

    start = time.perf_counter()
    model = graphprune.load_model(dense)
    report = graphprune.prune(model, ratio=0.3, round_to=64)
    out = graphprune.save_model(model, args.out / "pruned.onnx")
    print(f"load + prune 0.3 + verify + save in {time.perf_counter() - start:.1f}s, peak RSS {peak_rss_gb():.1f} GB; "
          f"params {report.params_before:,} -> {report.params_after:,}, verified={report.verified}")
    onnx.checker.check_model(str(out))
    print("onnx.checker on the saved pruned model (path, external data): ok")


if __name__ == "__main__":
    main()
