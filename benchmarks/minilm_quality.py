"""all-MiniLM-L6-v2 quality after pruning heads and FFN neurons: importance kinds, +- reconstruction.

    pip install -c constraints.txt -e '.[bench]'
    python benchmarks/minilm_quality.py [--ratios 0.5,0.25] [--calib 256] [--eval 256]
        [--kinds l2,activation,taylor] [--out benchmarks/results/minilm_quality.json]

Calibration: the first `--calib` sentences of Python's bundled documentation; evaluation: `--eval`
other sentences from further down the same text (never used for calibration). Per variant: mean
cosine between the pruned and the dense sentence embeddings, and top-5 nearest-neighbour agreement
(for each evaluation sentence, the share of its 5 nearest neighbours under the dense embeddings
that are also among its 5 nearest under the pruned ones). No fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import graphprune
from graphprune.models.minilm import (
    embed_onnx,
    english_sentences,
    export,
    load_encoder,
    mean_cosine,
    tokenize,
)


def top5_agreement(pruned: np.ndarray, dense: np.ndarray, k: int = 5) -> float:
    def neighbours(e: np.ndarray) -> np.ndarray:
        sims = e @ e.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1)[:, :k]

    a, b = neighbours(pruned), neighbours(dense)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)]))


def run(ratios: list[float], kinds: list[str], calib_count: int, eval_count: int, seq: int, folder: Path) -> list[dict]:
    sentences = english_sentences()
    calib = tokenize(list(sentences[:calib_count]), seq)
    held_out = tokenize(list(sentences[-eval_count:]), seq)
    encoder = load_encoder()
    dense = graphprune.save_model(export(encoder, calib), folder / "dense.onnx")
    reference = embed_onnx(dense, held_out)
    rows = []
    for ratio in ratios:
        for kind in kinds:
            for reconstruct in (False, True):
                model = graphprune.load_model(dense)
                start = time.perf_counter()
                graphprune.prune(model, ratio=ratio, importance=kind, calibration=calib, reconstruct=reconstruct)
                seconds = time.perf_counter() - start
                path = graphprune.save_model(model, folder / "pruned.onnx")
                embedded = embed_onnx(path, held_out)
                row = {"ratio": ratio, "importance": kind, "reconstruct": reconstruct,
                       "params": model.param_count(), "cosine": mean_cosine(embedded, reference),
                       "top5": top5_agreement(embedded, reference), "seconds": round(seconds, 1)}
                rows.append(row)
                print(f"{ratio:.0%} {kind:11s} reconstruct={str(reconstruct):5s} cosine {row['cosine']:.3f} "
                      f"top-5 {row['top5']:.3f} ({seconds:.0f}s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.5,0.25")
    parser.add_argument("--kinds", default="l2,activation")
    parser.add_argument("--calib", type=int, default=256, help="calibration sentences")
    parser.add_argument("--eval", type=int, default=256, help="evaluation sentences (disjoint)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/minilm_quality.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = run([float(r) for r in args.ratios.split(",")], args.kinds.split(","), args.calib, args.eval,
                   args.seq, Path(folder))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    setup = {k: v for k, v in vars(args).items() if k != "out"}
    args.out.write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
