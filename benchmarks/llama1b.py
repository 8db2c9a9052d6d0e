"""A billion parameters in bounded memory: `graphprune prune --ratio 0.3` on a ~1B LLaMA-style decoder.

    python benchmarks/llama1b.py [--folder DIR] [--ratio 0.3] [--out benchmarks/results/llama1b.json]
        [--keep]

Writes the model with `python -m graphprune.models.llama_writer` (16 layers, hidden 2048, 16 heads,
FFN 5632, vocab 32000: 953M parameters, 3.81 GB of fp32 external data), then prunes it with the CLI
(heads and FFN neurons by magnitude, verified with ONNX Runtime before and after every rewrite).
Each step runs as its own process; its wall time and peak resident memory (the kernel's ru_maxrss
for that process, which counts mapped file pages as well as allocations) are recorded against the
size of the weights. Last, `graphprune bench` times the dense and pruned models side by side
(batch 1, sequence 32). Not a test: it writes about 7 GB to disk and takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measured(command: list[str]) -> dict:
    """Run `command`; its wall time and peak RSS (bytes)."""
    start = time.perf_counter()
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(command)}")
    return {"wall_s": round(seconds, 1), "peak_rss_bytes": usage.ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="an empty or new folder for the models (default: a new "
                        "temporary one)")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/llama1b.json"))
    parser.add_argument("--keep", action="store_true", help="keep the written models")
    args = parser.parse_args()
    if args.folder is None:
        args.folder = Path(tempfile.mkdtemp(prefix="graphprune-llama1b-"))
    elif args.folder.exists() and any(args.folder.iterdir()):
        raise SystemExit(f"{args.folder} is not empty: give a new or empty folder (it is removed afterwards)")
    args.folder.mkdir(parents=True, exist_ok=True)
    dense, pruned, report = args.folder / "llama1b.onnx", args.folder / "pruned.onnx", args.folder / "report.json"
    timing = args.folder / "bench.json"
    try:
        write = measured([sys.executable, "-m", "graphprune.models.llama_writer", str(dense)])
        weight_bytes = dense.with_name(dense.name + ".data").stat().st_size
        prune = measured([sys.executable, "-m", "graphprune", "prune", str(dense), "-o", str(pruned),
                          "--ratio", str(args.ratio), "--report", str(report)])
        summary = json.loads(report.read_text())
        subprocess.run([sys.executable, "-m", "graphprune", "bench", str(dense), str(pruned), "--seq", "32",
                        "--runs", "3", "--repeats", "3", "--warmup", "1", "--json", str(timing)], check=True)
        dense_run, pruned_run = json.loads(timing.read_text())
        result = {
            "model": "LLaMA-style decoder from models/llama_writer.py (defaults), fp32 external data",
            "command": f"graphprune prune llama1b.onnx -o pruned.onnx --ratio {args.ratio}",
            "cpus": len(os.sched_getaffinity(0)),
            "weight_bytes": weight_bytes,
            "write": {**write, "peak_rss_vs_weights": round(write["peak_rss_bytes"] / weight_bytes, 2)},
            "prune": {**prune, "peak_rss_vs_weights": round(prune["peak_rss_bytes"] / weight_bytes, 2)},
            "params_before": summary["params_before"], "params_after": summary["params_after"],
            "pruned_weight_bytes": pruned.with_name(pruned.name + ".data").stat().st_size,
            "verified": summary["verified"],
            "pass_seconds": {p["name"]: p["seconds"] for p in summary["passes"]},
            "bench": {"shape": "batch 1 x sequence 32",
                      "latency_ms_median": [round(r["latency_ms_median"], 1) for r in (dense_run, pruned_run)],
                      "speedup": round(pruned_run["speedup"], 2), "speedup_rounds": pruned_run["speedup_rounds"],
                      "session_peak_memory_mb": [r["peak_memory_mb"] for r in (dense_run, pruned_run)]},
        }
    finally:
        if not args.keep:
            shutil.rmtree(args.folder, ignore_errors=True)
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
