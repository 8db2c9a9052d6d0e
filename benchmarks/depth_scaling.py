"""Does analysis time grow linearly with depth? LLaMA-style decoders of 4, 8, 16 and 32 layers.

    pip install -c constraints.txt -e '.[bench]'
    python benchmarks/depth_scaling.py [--depths 4,8,16,32] [--out benchmarks/results/depth_scaling.json]

Each model (models/attention.py `llama(layers)`: GQA, RoPE, SwiGLU, RMSNorm; hidden 64, dynamic batch
and sequence) is exported once with torch.onnx.export (dynamo) and then timed: load, analysis
(un-share constants, shape inference, dependency groups) and a whole `prune --ratio 0.3` (scores,
rewrite, cleanup, verification), the fastest of three runs each, with Python's garbage collector
paused while timing (as timeit does): with it on, a full collection of the heap now and then adds
up to a second at 32 layers, at random places. Reported per depth and per layer; linear growth means the per-layer
figures stay flat.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import graphprune
from graphprune.models.attention import llama

REPEATS = 3


def run(depths: list[int], folder: Path) -> list[dict]:
    rows = []
    for depth in depths:
        net = llama(depth)
        path = graphprune.save_model(graphprune.from_torch(net, net.example_inputs(), input_names=net.input_names,
                                                           dynamic_axes=net.dynamic_axes), folder / f"llama{depth}.onnx")
        best = {"load_s": float("inf"), "analysis_s": float("inf"), "prune_s": float("inf")}
        for _ in range(REPEATS):  # the fastest of a few: this machine is shared, pauses only add
            gc.collect()
            gc.disable()  # as timeit does: a collection of earlier runs' garbage is not this run's cost
            start = time.perf_counter()
            model = graphprune.load_model(path)
            loaded = time.perf_counter()
            deps = graphprune.inspect(model)
            analysed = time.perf_counter()
            graphprune.prune(model, ratio=0.3)
            pruned = time.perf_counter()
            gc.enable()
            for key, seconds in (("load_s", loaded - start), ("analysis_s", analysed - loaded),
                                 ("prune_s", pruned - analysed)):
                best[key] = min(best[key], round(seconds, 3))
        row = {"layers": depth, "nodes": len(graphprune.load_model(path).graph.nodes), "groups": len(deps.groups),
               **best}
        row["analysis_s_per_layer"] = round(row["analysis_s"] / depth, 4)
        row["prune_s_per_layer"] = round(row["prune_s"] / depth, 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="4,8,16,32")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/depth_scaling.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = run([int(d) for d in args.depths.split(",")], Path(folder))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
