"""Fingerprints of the models the CNN, MiniLM and fuzz benchmarks emit: one SHA-256 per model, so
a refactor can show it changed no output byte.

    python benchmarks/emitted.py --out /tmp/before.json      # on the old commit
    python benchmarks/emitted.py --check /tmp/before.json    # on the new one: exits 1 on a difference

The models are made the way the benchmarks make them (no timing, no Torch-Pruning):
- CNN (`cnn_vs_torch_pruning.py`): torchvision resnet18, mobilenet_v2 and efficientnet_b0, random
  weights (seed 0), exported by `graphprune.from_torch` at 224x224 (`--size`), pruned by L2 at 0.3
  and 0.5 with `round_to=8, round_mode="down"`;
- MiniLM (`minilm_vs_torch_pruning.py`, `minilm_quality.py`): the real all-MiniLM-L6-v2 exported on
  64 sentences of 128 tokens, L2 at 50%, and activation, taylor and obs + reconstruct at 50% with
  those sentences as calibration;
- fuzz (`fuzz.py`): `--cases` derandomized hypothesis cases, each the pruned model's bytes or its
  refusal message.
The dense exports are fingerprinted too (the frontend is part of what a refactor may touch).
Fingerprints are of `onnx.ModelProto.SerializeToString()` of the model as saved, weights included.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import onnx


def fingerprint(path: Path) -> str:
    return hashlib.sha256(onnx.load(str(path)).SerializeToString()).hexdigest()


def cnn(folder: Path, size: int) -> dict[str, str]:
    import torch
    import torchvision

    import graphprune

    out = {}
    for name in ("resnet18", "mobilenet_v2", "efficientnet_b0"):
        torch.manual_seed(0)
        net = getattr(torchvision.models, name)(weights=None).eval()
        example = torch.randn(1, 3, size, size)
        dense = graphprune.save_model(graphprune.from_torch(net, (example,), input_names=["x"], dynamic_batch=True),
                                      folder / f"{name}.onnx")
        out[f"cnn/{name}/dense"] = fingerprint(dense)
        for ratio in (0.3, 0.5):
            model = graphprune.load_model(dense)
            graphprune.prune(model, ratio=ratio, round_to=8, round_mode="down", importance="l2")
            out[f"cnn/{name}/l2 {ratio}"] = fingerprint(graphprune.save_model(model, folder / f"{name}-{ratio}.onnx"))
        print(f"cnn {name} done", flush=True)
    return out


def minilm(folder: Path) -> dict[str, str]:
    import graphprune
    from graphprune.models.minilm import english_sentences, export, load_encoder, tokenize

    feeds = tokenize(list(english_sentences()[:64]), 128)
    dense = graphprune.save_model(export(load_encoder(), feeds), folder / "minilm.onnx")
    out = {"minilm/dense": fingerprint(dense)}
    for name, options in {"l2": {"importance": "l2"}, "activation": {"importance": "activation", "calibration": feeds},
                          "taylor": {"importance": "taylor", "calibration": feeds},
                          "obs + reconstruct": {"importance": "obs", "calibration": feeds, "reconstruct": True}}.items():
        model = graphprune.load_model(dense)
        graphprune.prune(model, ratio=0.5, **options)
        out[f"minilm/{name} 0.5"] = fingerprint(graphprune.save_model(model, folder / "minilm-pruned.onnx"))
        print(f"minilm {name} done", flush=True)
    return out


def fuzz(cases: int) -> dict[str, str]:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    import graphprune
    from graphprune.errors import GraphpruneError
    from graphprune.testing.fuzz import (
        attention_graphs,
        conv_graphs,
        mlp_graphs,
        model_from_text,
        prune_options,
    )

    families = {"mlp": mlp_graphs, "conv": conv_graphs, "attention": attention_graphs}
    out: dict[str, str] = {}

    @settings(max_examples=cases, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(family=st.sampled_from(sorted(families)), data=st.data(), options=prune_options())
    def case(family: str, data, options: dict) -> None:
        text = data.draw(families[family]())
        model = model_from_text(text)
        try:
            graphprune.prune(model, seed=0, **options)
            result = model.to_onnx().SerializeToString()
        except GraphpruneError as exc:
            result = f"refused: {exc}".encode()
        key = f"fuzz/{len(out):04d} {family}"
        out[key] = hashlib.sha256(text.encode() + repr(sorted(options.items())).encode() + b"\0" + result).hexdigest()

    case()
    print(f"fuzz: {len(out)} cases", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the fingerprints here")
    parser.add_argument("--check", type=Path, help="compare with fingerprints written earlier; exit 1 on a difference")
    parser.add_argument("--cases", type=int, default=300, help="fuzz cases")
    parser.add_argument("--size", type=int, default=224, help="CNN input size")
    parser.add_argument("--only", help="cnn, minilm or fuzz (default: all)")
    args = parser.parse_args()
    start = time.perf_counter()
    prints: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.only in (None, "cnn"):
            prints |= cnn(folder, args.size)
        if args.only in (None, "minilm"):
            prints |= minilm(folder)
        if args.only in (None, "fuzz"):
            prints |= fuzz(args.cases)
    print(f"{len(prints)} fingerprints in {time.perf_counter() - start:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(prints, indent=1) + "\n")
    if args.check:
        before = json.loads(args.check.read_text())
        differ = sorted(k for k in before.keys() & prints.keys() if before[k] != prints[k])
        missing = sorted(before.keys() ^ prints.keys())
        for key in differ:
            print(f"DIFFERENT: {key}")
        for key in missing:
            print(f"only in one run: {key}")
        if differ or missing:
            sys.exit(1)
        print(f"all {len(prints)} identical")


if __name__ == "__main__":
    main()
