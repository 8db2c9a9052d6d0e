"""all-MiniLM-L6-v2 quality after pruning heads and FFN neurons: importance kinds, +- reconstruction,
+ distillation, and Torch-Pruning's magnitude pruning at the same setting.

    pip install -c constraints.txt -e '.[bench]'
    python benchmarks/minilm_quality.py [--ratios 0.5,0.25] [--calib 512] [--eval 256]
        [--kinds l2,activation,taylor,fisher,obs] [--distill-samples 1024] [--distill-epochs 6]
        [--distill-lr 5e-4] [--attention eager|default]
        [--out benchmarks/results/minilm_quality.json]

Calibration: the first `--calib` sentences of Python's bundled documentation; evaluation: the last
`--eval` sentences (never used for calibration or training) and, from a different source, the first
`--eval` sentences of `other_sentences()` (scikit-learn's data-set descriptions and the system's
licence texts). `--attention default` exports the model as `AutoModel.from_pretrained` gives it
(SDPA) instead of eager attention. Per variant: mean cosine between the
pruned and the dense sentence embeddings, and top-5 nearest-neighbour agreement (for each
evaluation sentence, the share of its 5 nearest neighbours under the dense embeddings that are also
among its 5 nearest under the pruned ones). Every kind runs with and without `--reconstruct`; then
the best training-free variant and plain l2 are distilled (`graphprune distill`, MSE on the token
states plus the hidden states) on the first `--distill-samples` sentences. Torch-Pruning's row:
MetaPruner with GroupMagnitudeImportance (L2), the same heads and neurons share in every layer.
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
    other_sentences,
    tokenize,
)
from graphprune.torch.distill import DistillOptions, distill


def top5_agreement(pruned: np.ndarray, dense: np.ndarray, k: int = 5) -> float:
    def neighbours(e: np.ndarray) -> np.ndarray:
        sims = e @ e.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1)[:, :k]

    a, b = neighbours(pruned), neighbours(dense)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)]))


class Bench:
    def __init__(self, calib_count: int, eval_count: int, distill_count: int, seq: int, folder: Path,
                 attention: str = "eager") -> None:
        sentences = english_sentences()
        if max(calib_count, distill_count) + eval_count > len(sentences):
            raise SystemExit(f"only {len(sentences)} sentences: calibration/distillation and evaluation would overlap")
        self.calib = tokenize(list(sentences[:calib_count]), seq)
        self.train = tokenize(list(sentences[:distill_count]), seq)
        self.held_out = tokenize(list(sentences[-eval_count:]), seq)
        self.other = tokenize(list(other_sentences()[:eval_count]), seq)
        self.folder = folder
        self.encoder = load_encoder(attention)
        self.dense_path = graphprune.save_model(export(self.encoder, self.calib), folder / "dense.onnx")
        self.reference = embed_onnx(self.dense_path, self.held_out)
        self.other_reference = embed_onnx(self.dense_path, self.other)
        self.rows: list[dict] = []

    def score(self, model, row: dict) -> dict:
        path = graphprune.save_model(model, self.folder / "variant.onnx")
        embedded, other = embed_onnx(path, self.held_out), embed_onnx(path, self.other)
        row = dict(row, params=model.param_count(), cosine=round(mean_cosine(embedded, self.reference), 4),
                   top5=round(top5_agreement(embedded, self.reference), 4),
                   cosine_other=round(mean_cosine(other, self.other_reference), 4),
                   top5_other=round(top5_agreement(other, self.other_reference), 4))
        self.rows.append(row)
        print(f"{row['ratio']:.0%} {row['tool']:13s} {row['importance']:9s} reconstruct={str(row['reconstruct']):5s} "
              f"distill={str(row['distill']):5s} cosine {row['cosine']:.3f} top-5 {row['top5']:.3f} "
              f"other: cosine {row['cosine_other']:.3f} top-5 {row['top5_other']:.3f} ({row['seconds']:.0f}s)",
              flush=True)
        return row

    def graphprune(self, ratio: float, kind: str, reconstruct: bool):
        model = graphprune.load_model(self.dense_path)
        start = time.perf_counter()
        graphprune.prune(model, ratio=ratio, importance=kind, calibration=self.calib, reconstruct=reconstruct)
        row = {"ratio": ratio, "tool": "graphprune", "importance": kind, "reconstruct": reconstruct,
               "distill": False, "seconds": round(time.perf_counter() - start, 1)}
        return model, self.score(model, row)

    def distilled(self, model, row: dict, epochs: int, lr: float) -> dict:
        dense = graphprune.load_model(self.dense_path)
        result = distill(model, dense, self.train, DistillOptions(epochs=epochs, lr=lr, hidden=True))
        return self.score(model, dict(row, distill=True, seconds=round(row["seconds"] + result.seconds, 1),
                                      distill_loss=[round(result.loss_before, 5), round(result.loss_after, 5)]))

    def torch_pruning(self, ratio: float) -> dict:
        from minilm_vs_torch_pruning import torch_pruning_variant

        start = time.perf_counter()
        pruned = torch_pruning_variant(self.encoder, self.calib, ratio)
        model = export(pruned, self.calib)
        row = {"ratio": ratio, "tool": "Torch-Pruning", "importance": "l2", "reconstruct": False,
               "distill": False, "seconds": round(time.perf_counter() - start, 1)}
        return self.score(model, row)


def run(bench: Bench, ratios: list[float], kinds: list[str], epochs: int, lr: float) -> None:
    for ratio in ratios:
        bench.torch_pruning(ratio)
        kept = {}
        for kind in kinds:
            for reconstruct in (False, True):
                model, row = bench.graphprune(ratio, kind, reconstruct)
                kept[(kind, reconstruct)] = (model, row)
        if epochs:
            best = max(kept.values(), key=lambda item: item[1]["cosine"])
            bench.distilled(*best, epochs, lr)
            if "l2" in kinds and best is not kept[("l2", False)]:
                bench.distilled(*kept[("l2", False)], epochs, lr)


def markdown(rows: list[dict]) -> str:
    lines = ["| removed | tool | importance | reconstruct | distill | params | cosine | top-5 | cosine (other) "
             "| top-5 (other) | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ratio']:.0%} | {r['tool']} | {r['importance']} | {'yes' if r['reconstruct'] else '-'} | "
                     f"{'yes' if r['distill'] else '-'} | {r['params'] / 1e6:.2f}M | {r['cosine']:.3f} | "
                     f"{r['top5']:.3f} | {r['cosine_other']:.3f} | {r['top5_other']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.5,0.25")
    parser.add_argument("--kinds", default="l2,activation,taylor,fisher,obs")
    parser.add_argument("--calib", type=int, default=512, help="calibration sentences")
    parser.add_argument("--eval", type=int, default=256, help="evaluation sentences (disjoint)")
    parser.add_argument("--distill-samples", type=int, default=1024, help="training sentences for distillation")
    parser.add_argument("--distill-epochs", type=int, default=6, help="0: no distillation rows")
    parser.add_argument("--distill-lr", type=float, default=5e-4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--attention", choices=("eager", "default"), default="eager",
                        help="the encoder's attention: eager, or transformers' default (SDPA)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/minilm_quality.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        bench = Bench(args.calib, args.eval, args.distill_samples, args.seq, Path(folder), args.attention)
        run(bench, [float(r) for r in args.ratios.split(",")], args.kinds.split(","), args.distill_epochs,
            args.distill_lr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    setup = {k: v for k, v in vars(args).items() if k != "out"}
    setup["minutes"] = round((time.perf_counter() - started) / 60, 1)
    args.out.write_text(json.dumps({"setup": setup, "rows": bench.rows}, indent=2) + "\n")
    print(markdown(bench.rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
