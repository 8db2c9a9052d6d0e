"""How calibrated pruning scales with depth: SmolLM2 cut to 10, 20 and 30 decoder layers,
`--ratio 0.2 --importance obs --reconstruct` on 128 windows of 256 tokens (one sequential
pass: `prune-sequential`).

    pip install -c constraints.txt -e '.[llm]'
    python benchmarks/llm_calibration_time.py [--layers 10 20 30] [--samples 128]
        [--out benchmarks/results/llm_calibration_time.json]

Each depth runs in its own process, so its peak memory (max RSS) is its own. Calibration: the
first windows of Python's bundled documentation (`pydoc_data.topics`), 256 tokens each, no
padding. The time is `graphprune.prune` alone (scores, plan, rewrite, refit, verification), not
the export or the model load; the per-pass seconds come from the prune report.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def one_depth(layers: int, samples: int) -> dict:
    import pydoc_data.topics

    import graphprune
    from graphprune.models import smollm2
    from graphprune.tools.perplexity import causal_feeds, text_windows

    folder = smollm2.cache_dir() / "smollm2"
    path = folder / ("plain.onnx" if layers == 30 else f"plain_{layers}_layers.onnx")
    if not path.is_file():
        smollm2.export_plain(path, layers=None if layers == 30 else layers)
    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    windows = text_windows(text, smollm2.tokenizer(), 256, samples)
    model = graphprune.load_model(path)
    calibration = causal_feeds(model, windows, {})
    start = time.perf_counter()
    report = graphprune.prune(model, ratio=0.2, importance="obs", calibration=calibration, reconstruct=True)
    seconds = time.perf_counter() - start
    passes = {p.name: round(p.seconds, 1) for p in report.passes}
    refit = next(p.stats for p in report.passes if "layers_refit" in p.stats)  # prune-sequential
    return {"layers": layers, "samples": samples, "tokens": int(calibration["input_ids"].size),
            "seconds": round(seconds, 1), "pass_seconds": passes, "layers_refit": refit["layers_refit"],
            "stream_peak_mib": refit.get("stream_peak_mib"), "verified": report.verified,
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[10, 20, 30])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/llm_calibration_time.json"))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process: one depth
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_depth(args.one, args.samples)))
        return
    rows = []
    for layers in args.layers:
        done = subprocess.run([sys.executable, __file__, "--one", str(layers), "--samples", str(args.samples)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{layers} layers failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    per_layer = [round(r["seconds"] / r["layers"], 2) for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "seconds_per_layer": per_layer}, indent=2) + "\n")
    print(f"seconds per layer: {per_layer}; wrote {args.out}")


if __name__ == "__main__":
    main()
