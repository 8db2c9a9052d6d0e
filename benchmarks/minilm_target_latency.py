"""`--target-latency` on all-MiniLM-L6-v2: does the pruned model run at the asked fraction of the
dense latency when timed again, independently, after the search?

    pip install -c constraints.txt -e '.[bench]'
    python benchmarks/minilm_target_latency.py [--target 0.6] [--runs 30] [--repeats 5]
        [--out benchmarks/results/minilm_target_latency.json]

Runs the CLI exactly as a user would (`graphprune prune dense.onnx --target-latency F --importance obs
--reconstruct --calib calib.npz --report report.json`); the search times candidates on the first 8
calibration sentences (batch 8, sequence 128). Then dense and pruned are timed again with
graphprune.tools.bench (ORT CPU, 2 threads, the same batch, interleaved round-robin, `--repeats` rounds
of `--runs` runs) and the median latency ratio is compared with the target (+-10% is the bar).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import graphprune
from graphprune.models.minilm import english_sentences, export, load_encoder, tokenize
from graphprune.tools.bench import bench_models
from graphprune.tools.cli import main as cli


def run(target: float, runs: int, repeats: int, calib_count: int, folder: Path) -> dict:
    calib = tokenize(list(english_sentences()[:calib_count]), 128)
    dense = graphprune.save_model(export(load_encoder(), calib), folder / "dense.onnx")
    calib_path = folder / "calib.npz"
    np.savez(calib_path, **calib)
    pruned, report = folder / "pruned.onnx", folder / "report.json"
    start = time.perf_counter()
    code = cli(["prune", str(dense), "-o", str(pruned), "--target-latency", str(target), "--importance", "obs",
                "--reconstruct", "--calib", str(calib_path), "--report", str(report)])
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"graphprune prune failed with exit code {code}")
    stats = next(p["stats"] for p in json.loads(report.read_text())["passes"] if p["name"] == "prune-units")
    feeds = {name: array[:8] for name, array in calib.items()}
    ratios = []
    for _ in range(repeats):
        base, ours = bench_models([dense, pruned], threads=2, runs=runs, feeds=feeds)
        ratios.append(ours.latency_ms_median / base.latency_ms_median)
        print(f"dense {base.latency_ms_median:.2f} ms, pruned {ours.latency_ms_median:.2f} ms: "
              f"{ratios[-1]:.3f} of dense", flush=True)
    measured = float(np.median(ratios))
    return {"target_latency": target, "reported_latency": stats["reached_latency"], "ratio": stats["ratio"],
            "measured_latency": round(measured, 4), "per_round": [round(r, 4) for r in ratios],
            "within_10_percent": abs(measured - target) <= 0.1 * target, "prune_seconds": round(seconds, 1),
            "params_after": graphprune.load_model(pruned).param_count(),
            "params_before": graphprune.load_model(dense).param_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.6)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calib", type=int, default=256, help="calibration sentences")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/minilm_target_latency.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        result = run(args.target, args.runs, args.repeats, args.calib, Path(folder))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
