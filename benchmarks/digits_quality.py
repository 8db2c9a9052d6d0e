"""The digits CNN: held-out accuracy after removing 50% of its channels and neurons, per importance
kind, +- reconstruction, + distillation.

    pip install -c constraints.txt -e '.[bench]'
    python benchmarks/digits_quality.py [--ratio 0.5] [--kinds l2,activation,taylor,fisher,obs]
        [--calib 512] [--distill-epochs 2] [--out benchmarks/results/digits_quality.json]

DigitsCNN (models/digits.py) is trained on scikit-learn's bundled 8x8 digits (75% of the images),
exported, and pruned at `--ratio` of every group (conv channels and the hidden neurons of the
classifier). Calibration: the first `--calib` training images with their labels (so `taylor` and
`fisher` use the cross-entropy task loss). Distillation: `graphprune distill` with KL on the logits
(temperature 2) over the whole training set, `--distill-epochs` epochs. Accuracy: ONNX Runtime on
the 25% of images never trained on.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import graphprune
from graphprune import runtime
from graphprune.models.digits import DigitsCNN, load_digits, train_digits
from graphprune.torch.distill import DistillOptions, distill


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    logits = runtime.session(model.to_onnx(), threads=2).run(None, {"image": x})[0]
    return float(np.mean(np.argmax(logits, axis=1) == y))


def run(ratio: float, kinds: list[str], calib_count: int, epochs: int, lr: float, folder: Path) -> list[dict]:
    x_train, y_train, x_test, y_test = load_digits()
    torch.manual_seed(0)
    net = DigitsCNN()
    train_digits(net, x_train, y_train, epochs=30)
    dense_path = graphprune.save_model(
        graphprune.from_torch(net, net.example_inputs(), input_names=["image"], dynamic_batch=True),
        folder / "dense.onnx")
    dense = graphprune.load_model(dense_path)
    rows = [{"variant": "dense", "importance": "-", "reconstruct": False, "distill": False,
             "params": dense.param_count(), "accuracy": accuracy(dense, x_test, y_test), "seconds": 0.0}]
    print(f"dense accuracy {rows[0]['accuracy']:.4f}", flush=True)
    calib = {"image": x_train[:calib_count]}
    labels = y_train[:calib_count]
    for kind in kinds:
        for reconstruct in (False, True):
            model = graphprune.load_model(dense_path)
            start = time.perf_counter()
            graphprune.prune(model, ratio=ratio, importance=kind, calibration=calib, labels=labels,
                             reconstruct=reconstruct)
            seconds = time.perf_counter() - start
            row = {"variant": f"{ratio:.0%} pruned", "importance": kind, "reconstruct": reconstruct,
                   "distill": False, "params": model.param_count(), "accuracy": accuracy(model, x_test, y_test),
                   "seconds": round(seconds, 2)}
            rows.append(row)
            print(f"{kind:10s} reconstruct={str(reconstruct):5s} accuracy {row['accuracy']:.4f} ({seconds:.1f}s)",
                  flush=True)
            if epochs:
                result = distill(model, dense, {"image": x_train},
                                 DistillOptions(epochs=epochs, lr=lr, batch=32, loss="kl"))
                rows.append(dict(row, distill=True, accuracy=accuracy(model, x_test, y_test),
                                 seconds=round(seconds + result.seconds, 2)))
                print(f"{kind:10s} reconstruct={str(reconstruct):5s} + distill accuracy {rows[-1]['accuracy']:.4f} "
                      f"({result.seconds:.1f}s)", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    dense = rows[0]["accuracy"]
    lines = ["| variant | importance | reconstruct | distill (2 epochs) | params | accuracy | vs dense |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['importance']} | {'yes' if r['reconstruct'] else '-'} | "
                     f"{'yes' if r['distill'] else '-'} | {r['params']:,} | {r['accuracy']:.2%} | "
                     f"{(r['accuracy'] - dense) * 100:+.1f} pt |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--kinds", default="l2,activation,taylor,fisher,obs")
    parser.add_argument("--calib", type=int, default=512, help="calibration images (with labels)")
    parser.add_argument("--distill-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3, help="distillation learning rate")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/digits_quality.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = run(args.ratio, args.kinds.split(","), args.calib, args.distill_epochs, args.lr, Path(folder))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    setup = {k: v for k, v in vars(args).items() if k != "out"}
    args.out.write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    print(markdown(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
