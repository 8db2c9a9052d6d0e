"""Does `graphprune bench` cancel machine noise? Identical models must come out at 1.0x.

    pip install -c constraints.txt -e '.[bench]'
    python benchmarks/bench_method.py [--runs 30] [--repeats 3] [--out benchmarks/results/bench_method.json]

Two pairs, each timed by `graphprune.tools.bench.bench_models` exactly as `graphprune bench` times them
(interleaved rounds, 2 threads): all-MiniLM-L6-v2 (batch 8 x 128 tokens) and torchvision's
ResNet-18 (random weights, 1x3x224x224). For each pair: the model against a byte-identical copy of
itself (the ratio must stay within 0.9-1.1 in every round) and the model against its 50%-pruned
version (heads+FFN for MiniLM, channels for ResNet-18), the speedup a user would read.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import graphprune
from graphprune.tools.bench import bench_models


def _pairs(folder: Path) -> dict[str, tuple[Path, dict]]:
    import torch
    import torchvision

    from graphprune.models.minilm import english_sentences, export, load_encoder, tokenize

    calib = tokenize(list(english_sentences()[:64]), 128)
    minilm = graphprune.save_model(export(load_encoder(), calib), folder / "minilm.onnx")
    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval()
    resnet = graphprune.save_model(
        graphprune.from_torch(net, (torch.randn(1, 3, 224, 224),), input_names=["image"], dynamic_batch=True),
        folder / "resnet18.onnx")
    return {"all-MiniLM-L6-v2": (minilm, {"batch": 8, "seq": 128}),
            "resnet18": (resnet, {"shapes": {"image": [1, 3, 224, 224]}})}


def run(runs: int, repeats: int, folder: Path) -> dict:
    results = {}
    for name, (path, shape) in _pairs(folder).items():
        twin = shutil.copy(path, folder / f"{path.stem}-copy.onnx")
        pruned = folder / f"{path.stem}-pruned.onnx"
        model = graphprune.load_model(path)
        graphprune.prune(model, ratio=0.5)
        graphprune.save_model(model, pruned)
        same = bench_models([path, Path(twin)], threads=2, runs=runs, repeats=repeats, **shape)
        smaller = bench_models([path, pruned], threads=2, runs=runs, repeats=repeats, memory=True, **shape)
        rounds = same[1].speedup_rounds
        results[name] = {"identical_ratio_rounds": rounds, "identical_within_0.9_1.1": all(0.9 <= r <= 1.1 for r in rounds),
                         "pruned": [r.to_json() for r in smaller]}
        print(f"{name}: identical copy {', '.join(f'{r:.3f}' for r in rounds)}; pruned 50% "
              f"{smaller[1].speedup:.2f}x (rounds {', '.join(f'{r:.2f}' for r in smaller[1].speedup_rounds)}), "
              f"peak memory {smaller[0].peak_memory_mb} -> {smaller[1].peak_memory_mb} MB", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_method.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = run(args.runs, args.repeats, Path(folder))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"setup": {"runs": args.runs, "repeats": args.repeats}, "pairs": results},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
