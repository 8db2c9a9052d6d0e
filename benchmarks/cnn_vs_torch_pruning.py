"""Dense vs graphprune vs Torch-Pruning on torchvision CNNs, all measured side by side in ONNX Runtime.

    pip install -c constraints.txt -e '.[bench]'
    python benchmarks/cnn_vs_torch_pruning.py [--models resnet18,resnet50,mobilenet_v2,efficientnet_b0]
        [--ratios 0.3,0.5] [--runs 20] [--threads 2] [--size 224] [--out benchmarks/results/cnn.json]

Every variant is exported the same way (graphprune.from_torch: torch.onnx.export, dynamo, opset 20,
dynamic batch); both prune with L2 magnitude, `round_to=8` rounding kept counts down (Torch-Pruning's
convention; graphprune's `--round-mode down`), the same per-group ratio, the classifier output kept. Latency is timed in ONE interleaved round-robin run per batch size
(graphprune.tools.bench), so machine noise hits every variant alike; speedups are ratios in that run.
Random weights: this measures speed and size, not accuracy.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch
import torchvision

import graphprune
from graphprune.analysis import cost
from graphprune.tools.bench import bench_models


def classifier_layers(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The final Linear (Torch-Pruning must not prune the class outputs; graphprune freezes them)."""
    return [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1:]


def torch_pruning_variant(net: torch.nn.Module, example: torch.Tensor, ratio: float) -> torch.nn.Module:
    import torch_pruning as tp

    pruned = copy.deepcopy(net)
    pruner = tp.pruner.MetaPruner(pruned, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, round_to=8, ignored_layers=classifier_layers(pruned))
    pruner.step()
    return pruned.eval()


def export(net: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    return graphprune.save_model(graphprune.from_torch(net, (example,), input_names=["x"], dynamic_batch=True), path)


def macs_of(path: Path) -> int:
    model = graphprune.load_model(path)
    model.infer_shapes()
    return cost.totals(model).macs


def run(models: list[str], ratios: list[float], runs: int, threads: int, size: int, folder: Path) -> list[dict]:
    rows = []
    for name in models:
        torch.manual_seed(0)
        net = getattr(torchvision.models, name)(weights=None).eval()
        example = torch.randn(1, 3, size, size)
        variants = {"dense": export(net, example, folder / f"{name}-dense.onnx")}
        for ratio in ratios:
            model = graphprune.load_model(variants["dense"])
            # round_mode "down" is Torch-Pruning's rounding: both get the same channel counts
            graphprune.prune(model, ratio=ratio, round_to=8, round_mode="down", importance="l2")
            variants[f"graphprune {ratio}"] = graphprune.save_model(model, folder / f"{name}-gp-{ratio}.onnx")
            variants[f"torch-pruning {ratio}"] = export(torch_pruning_variant(net, example, ratio), example,
                                                        folder / f"{name}-tp-{ratio}.onnx")
        paths = list(variants.values())
        latency = {batch: bench_models(paths, batch=batch, threads=threads, runs=runs) for batch in (1, 8)}
        for index, (label, path) in enumerate(variants.items()):
            row = {"model": name, "variant": label, "params": latency[1][index].params, "macs": macs_of(path)}
            for batch, results in latency.items():
                row[f"ms_b{batch}"] = results[index].latency_ms_median
                row[f"speedup_b{batch}"] = results[0].latency_ms_median / results[index].latency_ms_median
            rows.append(row)
            print(f"{name:16s} {label:18s} params {row['params']:>10,} MACs {row['macs'] / 1e6:8.1f}M "
                  f"b1 {row['ms_b1']:7.2f} ms ({row['speedup_b1']:.2f}x)  b8 {row['ms_b8']:8.2f} ms "
                  f"({row['speedup_b8']:.2f}x)", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | variant | params | MACs | batch 1 ms | speedup | batch 8 ms | speedup |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['params'] / 1e6:.2f}M | {r['macs'] / 1e9:.2f}G | "
                     f"{r['ms_b1']:.1f} | {r['speedup_b1']:.2f}x | {r['ms_b8']:.1f} | {r['speedup_b8']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50,mobilenet_v2,efficientnet_b0")
    parser.add_argument("--ratios", default="0.3,0.5")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cnn.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gp-bench-") as folder:
        rows = run(args.models.split(","), [float(r) for r in args.ratios.split(",")], args.runs, args.threads,
                   args.size, Path(folder))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(markdown(rows))


if __name__ == "__main__":
    main()
