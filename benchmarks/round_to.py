"""How kept channel counts map to ONNX Runtime CPU latency (the default of `round_to`).

    python benchmarks/round_to.py [--runs 200] [--threads 2]

Times a 3-layer 3x3 conv stack (C -> C -> C channels, 28x28, batch 1) for C around multiples of
8 and 16, every count in one interleaved run, and prints latency per count and the ratio of each
count's latency to the next multiple of 8 above it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx_graphsurgeon as gs

from graphprune import runtime
from graphprune.ir.model import Model


def conv_stack(channels: int, size: int = 28, layers: int = 3) -> Model:
    rng = np.random.default_rng(0)
    x = gs.Variable("x", np.float32, [1, channels, size, size])
    current, nodes = x, []
    for i in range(layers):
        w = gs.Constant(f"w{i}", rng.standard_normal((channels, channels, 3, 3)).astype(np.float32) * 0.05)
        out = gs.Variable(f"h{i}", np.float32)
        nodes.append(gs.Node("Conv", f"conv{i}", {"pads": [1, 1, 1, 1]}, inputs=[current, w], outputs=[out]))
        act = gs.Variable(f"r{i}", np.float32)
        nodes.append(gs.Node("Relu", f"relu{i}", inputs=[out], outputs=[act]))
        current = act
    current.shape = [1, channels, size, size]
    return Model(gs.Graph(nodes=nodes, inputs=[x], outputs=[current], opset=20), ir_version=10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--counts", default="40,41,44,47,48,49,52,55,56,57,60,63,64")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    sessions = {}
    for c in counts:
        proto = conv_stack(c).to_onnx()
        sessions[c] = (runtime.session(proto, threads=args.threads), runtime.sample_inputs(proto))
        for _ in range(10):
            sessions[c][0].run(None, sessions[c][1])
    times = {c: [] for c in counts}
    for _ in range(args.runs):
        for c, (sess, feeds) in sessions.items():
            start = time.perf_counter()
            sess.run(None, feeds)
            times[c].append(time.perf_counter() - start)
    median = {c: float(np.median(t)) * 1e3 for c, t in times.items()}
    print("| channels | median ms | ms per channel² x1e3 | vs next multiple of 8 |")
    print("|---:|---:|---:|---:|")
    for c in counts:
        up = -(-c // 8) * 8
        ratio = median[c] / median[up] if up in median else float("nan")
        print(f"| {c} | {median[c]:.3f} | {median[c] / c ** 2 * 1e3:.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
