"""all-MiniLM-L6-v2: dense vs graphprune vs Torch-Pruning, heads and FFN neurons, in ONNX Runtime.

    pip install -c constraints.txt -e '.[bench]'
    python benchmarks/minilm_vs_torch_pruning.py [--ratio 0.5] [--runs 30] [--repeats 3] [--threads 2]
        [--batch 8] [--seq 128] [--sentences 256] [--out benchmarks/results/minilm.json]

Both tools remove the same share of attention heads (whole heads, head_dim kept) and of FFN
neurons in every layer, scored by L2 magnitude, and keep the hidden size; no fine-tuning.
graphprune prunes the exported ONNX graph; Torch-Pruning prunes the torch module (MetaPruner with
`num_heads`, `prune_num_heads=True`), after which its attention modules' head counts must be edited
by hand before export. All variants are exported the same way (torch.onnx.export, dynamo, dynamic
batch and sequence) and timed in ONE interleaved round-robin run (graphprune.tools.bench) on real
English sentences (batch 8, sequence 128), so the speedups are ratios measured side by side.
Fidelity: mean cosine between each variant's sentence embeddings and the dense model's.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

import graphprune
from graphprune.models.minilm import (
    SentenceEncoder,
    embed_onnx,
    english_sentences,
    export,
    load_encoder,
    mean_cosine,
    tokenize,
)
from graphprune.tools.bench import bench_models


def torch_pruning_variant(encoder: SentenceEncoder, example: dict[str, np.ndarray], ratio: float) -> SentenceEncoder:
    import torch_pruning as tp

    pruned = copy.deepcopy(encoder)
    bert = pruned.model
    attentions = [layer.attention.self for layer in bert.encoder.layer]
    num_heads = {linear: att.num_attention_heads for att in attentions for linear in (att.query, att.key, att.value)}
    # keep the hidden size, as graphprune does by default: no output of the residual stream is a root
    ignored = [bert.embeddings] + [layer.attention.output.dense for layer in bert.encoder.layer] + \
              [layer.output.dense for layer in bert.encoder.layer]
    inputs = tuple(torch.from_numpy(example[name][:2]) for name in encoder.input_names)
    pruner = tp.pruner.MetaPruner(pruned, inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=ignored, num_heads=num_heads,
                                  prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio,
                                  output_transform=lambda out: out.sum())
    pruner.step()
    for att in attentions:  # the hand edit Torch-Pruning leaves to its users
        att.num_attention_heads = pruner.num_heads[att.query]
        att.all_head_size = att.query.out_features
        att.attention_head_size = att.all_head_size // att.num_attention_heads
    return pruned.eval()


def export_to(encoder: SentenceEncoder, feeds: dict[str, np.ndarray], path: Path) -> Path:
    return graphprune.save_model(export(encoder, feeds), path)


def run(ratio: float, runs: int, threads: int, batch: int, seq: int, sentences: int, repeats: int,
        folder: Path) -> list[dict]:
    encoder = load_encoder()
    text = list(english_sentences()[:sentences])
    feeds = tokenize(text, seq)
    variants = {"dense": export_to(encoder, feeds, folder / "dense.onnx")}
    model = graphprune.load_model(variants["dense"])
    graphprune.prune(model, ratio=ratio, importance="l2")
    variants[f"graphprune {ratio:.0%}"] = graphprune.save_model(model, folder / "graphprune.onnx")
    variants[f"torch-pruning {ratio:.0%}"] = export_to(torch_pruning_variant(encoder, feeds, ratio), feeds,
                                                    folder / "torch-pruning.onnx")
    paths = list(variants.values())
    timed = {k: v[:batch] for k, v in feeds.items()}
    # several interleaved rounds: the spread of the graphprune / Torch-Pruning ratio shows the noise
    rounds = [bench_models(paths, threads=threads, runs=runs, feeds=timed) for _ in range(repeats)]
    ms = np.array([[r.latency_ms_median for r in results] for results in rounds])  # [round, variant]
    peer = ms[:, 1] / ms[:, 2]
    print(f"graphprune / torch-pruning latency per round: {', '.join(f'{x:.3f}' for x in peer)}")
    reference = embed_onnx(paths[0], feeds)
    rows = []
    for index, ((label, path), result) in enumerate(zip(variants.items(), rounds[0], strict=True)):
        median = float(np.median(ms[:, index]))
        row = {"variant": label, "params": result.params, "file_mb": result.file_bytes / 1e6, "ms": median,
               "speedup": float(np.median(ms[:, 0] / ms[:, index])),
               "ms_per_round": ms[:, index].tolist(),
               "cosine_to_dense": mean_cosine(embed_onnx(path, feeds), reference)}
        if index == 1:
            row["latency_vs_torch_pruning"] = peer.tolist()
        rows.append(row)
        print(f"{label:20s} params {row['params']:>11,}  {row['file_mb']:6.1f} MB  {row['ms']:8.2f} ms  "
              f"{row['speedup']:.2f}x  cosine {row['cosine_to_dense']:.3f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--sentences", type=int, default=256, help="sentences for the embedding cosine")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/minilm.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = run(args.ratio, args.runs, args.threads, args.batch, args.seq, args.sentences, args.repeats,
                   Path(folder))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    setup = {k: v for k, v in vars(args).items() if k != "out"}
    args.out.write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
