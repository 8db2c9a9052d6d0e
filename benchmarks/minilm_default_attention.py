"""all-MiniLM-L6-v2 as users export it (default attention, SDPA) against the eager export: same
heads and neurons pruned, same parameters, same speedup.

    pip install -c constraints.txt -e '.[bench]'
    python benchmarks/minilm_default_attention.py [--ratio 0.5] [--runs 30] [--repeats 5] [--threads 2]
        [--batch 8] [--seq 128] [--calib 256] [--eval 256]
        [--out benchmarks/results/minilm_default_attention.json]

`AutoModel.from_pretrained(path)` gives SDPA attention, whose dynamo export carries K through a
[batch * heads, seq, head_dim] tensor; `attn_implementation="eager"` gives the explicit graph. Both
are exported by dynamo (dynamic batch and sequence), pruned with `--ratio R` (heads and FFN
neurons, L2 magnitude) and timed with their dense models in ONE interleaved round-robin run
(graphprune.tools.bench, CPU, `--threads` threads, batch x seq real sentences), `--repeats` rounds.
Quality: mean cosine of the pruned model's sentence embeddings to its dense model's, on held-out
Python documentation sentences (the calibration source: `graphprune.models.minilm.english_sentences`)
and on sentences from other sources (`other_sentences`: scikit-learn's data-set descriptions and
the system's licence texts), with `--importance activation` calibrated on `--calib` Python
documentation sentences as the second row per export.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

import graphprune
from graphprune.models.minilm import (
    embed_onnx,
    english_sentences,
    export,
    load_encoder,
    mean_cosine,
    other_sentences,
    tokenize,
)
from graphprune.tools.bench import bench_models

ATTENTIONS = ("eager", "default")


def run(args: argparse.Namespace, folder: Path) -> dict:
    sentences = english_sentences()
    calib = tokenize(list(sentences[:args.calib]), args.seq)
    held_out = {"python-docs": tokenize(list(sentences[-args.eval:]), args.seq),
                "other-sources": tokenize(list(other_sentences()[:args.eval]), args.seq)}
    paths, rows = {}, []
    for attention in ATTENTIONS:
        dense = graphprune.save_model(export(load_encoder(attention), calib), folder / f"{attention}-dense.onnx")
        paths[f"{attention} dense"] = dense
        for importance in ("l2", "activation"):
            model = graphprune.load_model(dense)
            report = graphprune.prune(model, ratio=args.ratio, importance=importance,
                                      calibration=calib if importance != "l2" else None)
            heads = [(g["units_before"], g["units_after"]) for g in report.groups if g["kind"] == "head"]
            path = graphprune.save_model(model, folder / f"{attention}-{importance}.onnx")
            if importance == "l2":
                paths[f"{attention} pruned"] = path
            quality = {name: round(mean_cosine(embed_onnx(path, feeds), embed_onnx(dense, feeds)), 4)
                       for name, feeds in held_out.items()}
            rows.append({"attention": attention, "importance": importance, "params": model.param_count(),
                         "heads": heads, "cosine": quality})
            print(f"{attention:8s} {importance:10s} params {model.param_count():,}  heads {heads[:1]}x{len(heads)}  "
                  f"cosine {quality}", flush=True)
    timed = {name: values[:args.batch] for name, values in calib.items()}
    labels = list(paths)
    rounds = [bench_models([paths[k] for k in labels], threads=args.threads, runs=args.runs, feeds=timed)
              for _ in range(args.repeats)]
    ms = np.array([[r.latency_ms_median for r in results] for results in rounds])  # [round, variant]
    speedups = {attention: ms[:, labels.index(f"{attention} dense")] / ms[:, labels.index(f"{attention} pruned")]
                for attention in ATTENTIONS}
    relative = speedups["default"] / speedups["eager"]
    timing = {label: {"ms_median": float(np.median(ms[:, i])), "ms_per_round": ms[:, i].round(3).tolist()}
              for i, label in enumerate(labels)}
    for attention in ATTENTIONS:
        timing[f"{attention} pruned"]["speedup_median"] = float(np.median(speedups[attention]))
        timing[f"{attention} pruned"]["speedup_per_round"] = speedups[attention].round(4).tolist()
    summary = {"default_vs_eager_speedup_median": float(np.median(relative)),
               "default_vs_eager_speedup_per_round": relative.round(4).tolist()}
    for label in labels:
        print(f"{label:16s} {timing[label]['ms_median']:8.2f} ms"
              + (f"  speedup {timing[label]['speedup_median']:.3f}x" if "speedup_median" in timing[label] else ""))
    print(f"default-export speedup / eager-export speedup: median {summary['default_vs_eager_speedup_median']:.3f} "
          f"(per round {', '.join(f'{x:.3f}' for x in relative)})")
    return {"rows": rows, "timing": timing, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--calib", type=int, default=256, help="calibration sentences (Python docs)")
    parser.add_argument("--eval", type=int, default=256, help="held-out sentences per source")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/minilm_default_attention.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        result = run(args, Path(folder))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    setup = {k: v for k, v in vars(args).items() if k != "out"}
    args.out.write_text(json.dumps({"setup": setup, **result}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
