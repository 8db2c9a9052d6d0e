"""SmolLM2-135M pruned by each criterion to a share of its non-embedding parameters: perplexity on
held-out text, prefill latency and decode tokens/s with the KV cache, dense side by side.

    pip install -c constraints.txt -e '.[llm,bench]'
    python benchmarks/llm_quality.py [--shares 0.1,0.2,0.3,0.5] [--methods "l2;wanda-sp"]
        [--calib 32] [--eval 16] [--out benchmarks/results/llm_quality.json]

The model is the onnxruntime-genai builder's export (KV cache, GroupQueryAttention): the graph a
deployment runs. Text: Python's bundled documentation (`pydoc_data.topics`) as one token stream in
windows of 256; calibration: the first `--calib` windows; perplexity (as `graphprune eval`
computes it) on the last `--eval` windows of the documentation (never calibrated on) and on
`--eval` windows of other sources (`models/minilm.other_sentences()`: scikit-learn's data-set
descriptions and the system's licence texts).

A share is of the 106.2M non-embedding parameters (the tied 28.3M embedding is not pruned by
anyone here); each row states the share it reached. Methods:
- `l2`, `wanda-sp` (`--importance activation`), `flap` (fluctuation + bias compensation) and
  `obs + reconstruct` (one sequential pass): FFN neurons only, the same share of every layer's
  (`--ratio 0 --neuron-ratio F`, F = the share over the FFN's 75% of the parameters);
- `obs + reconstruct, KV heads`: one KV head of 3 (and its query heads) in every layer plus FFN
  neurons for the rest of the share (shares of 10% have no room for a head);
- `block removal`: `--drop-blocks N` (Block Influence on the calibration windows), N residual
  sub-blocks (attention or MLP), the fewest whose parameters reach the share. The genai graph fuses its residual adds into SkipSimplifiedLayerNormalization, which
  `drop-blocks` does not recognise, so these rows prune the plain export (no cache) of the same
  weights; their prefill is timed against the dense plain export and decode is not measured;
- `Torch-Pruning LLM recipe` (`--tp PYTHON`): its examples/LLMs/prune_llm.py (`tp_llm_recipe.py`,
  in an environment of its own: see there) on the Hugging Face model: group L2 magnitude, one
  uniform ratio for the hidden size, FFN and query heads (one of the 3 per KV group at any ratio),
  round_to 4, lm_head ignored; the ratio chosen to remove the share; then the genai builder on the
  pruned folder. Its hidden-size cut narrows the tied embedding too; `share_removed` counts the
  non-embedding parameters only, `params` everything;
- `obs + reconstruct + distill` (and `..., 2 epochs`): the FFN-only model trained on the
  `--distill-windows` windows after the calibration ones (next-token KL over the teacher's top 64,
  temperature 1, one epoch (two), batch 4, lr 1e-4), at `--distill-shares`; the same architecture
  as the undistilled row.
Timing: every model and the dense one in turns, `--rounds` rounds, ORT CPU 2 threads: prefill =
the fastest of 5 runs per round of one 256-token window with empty caches; decode = tokens/s of
the cached steps of a greedy generation of `--tokens` tokens after a prompt (their ORT run time),
best round. Ratios to dense are of one run; absolute figures depend on the machine's load.
`--only-timing` re-times the models of an earlier run kept in `--work`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import graphprune
from graphprune import runtime
from graphprune.models import smollm2
from graphprune.models.minilm import other_sentences
from graphprune.tools.generate import decode_rate
from graphprune.tools.perplexity import causal_feeds, perplexity, text_windows
from graphprune.torch.distill import DistillOptions, distill

LAYERS, HIDDEN, INTERMEDIATE, KV_WIDTH, HEAD = 30, 576, 1536, 192, 64
FFN = LAYERS * 3 * HIDDEN * INTERMEDIATE
# one KV head of 3 with its 3 query heads: Q columns (3 x 64), K and V columns (64 each), O rows (3 x 64)
KV_GROUP = LAYERS * HIDDEN * (2 * 3 * HEAD + 2 * HEAD)
NON_EMBEDDING = LAYERS * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_WIDTH + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN) + HIDDEN
TOTAL = NON_EMBEDDING + 49152 * HIDDEN
METHODS = ("l2", "wanda-sp", "flap", "obs + reconstruct", "obs + reconstruct, KV heads", "block removal",
           "Torch-Pruning LLM recipe", "obs + reconstruct + distill", "obs + reconstruct + distill, 2 epochs")
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def options_for(method: str, share: float) -> dict | None:
    """`graphprune.prune` options that remove about `share` of the non-embedding parameters."""
    removed = share * NON_EMBEDDING
    if method in ("l2", "wanda-sp", "flap"):
        importance = {"wanda-sp": "activation"}.get(method, method)
        return {"ratio": 0.0, "neuron_ratio": round(removed / FFN, 4), "importance": importance}
    if method == "obs + reconstruct":
        return {"ratio": 0.0, "neuron_ratio": round(removed / FFN, 4), "importance": "obs", "reconstruct": True}
    if method == "obs + reconstruct, KV heads":
        if removed <= KV_GROUP:
            return None
        return {"ratio": 0.0, "head_ratio": 0.34, "neuron_ratio": round((removed - KV_GROUP) / FFN, 4),
                "importance": "obs", "reconstruct": True}
    raise ValueError(method)


def blocks_for(share: float, model, calibration: dict) -> int:
    """How many residual sub-blocks (attention or MLP) `--drop-blocks` must drop, lowest Block
    Influence first as it ranks them, to remove `share` of the non-embedding parameters."""
    import onnx_graphsurgeon as gs

    from graphprune.passes.drop_blocks import contributions, find_blocks

    model.infer_shapes()
    blocks = find_blocks(model)
    scores = contributions(model, blocks, 0, "influence", calibration)
    removed = 0
    for count, index in enumerate(np.argsort(scores, kind="stable"), start=1):
        weights = {t.name: t.values.size for node in blocks[index].nodes for t in node.inputs
                   if isinstance(t, gs.Constant) and t.values.size >= HIDDEN}
        removed += sum(weights.values())
        if removed >= share * NON_EMBEDDING:
            return count
    return len(blocks) - 1


def torch_pruning_llm(share: float, folder: Path, python: str) -> dict:
    """Torch-Pruning's LLM recipe (`tp_llm_recipe.py`, run by `python`, an environment with
    transformers 4.48.3 and torch-pruning) on the Hugging Face model, exported by the genai builder; returns the export's path, the ratio and the seconds Torch-Pruning took (kept in
    `folder/tp.json`: a finished folder is reused)."""
    done = folder / "tp.json"
    if done.is_file():
        return json.loads(done.read_text()) | {"path": folder / "onnx" / "model.onnx"}
    source = smollm2.hf_folder()
    legacy = folder / "source"  # the same weights, the config keys transformers 4.48 reads
    legacy.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    config |= {"rope_theta": config["rope_parameters"]["rope_theta"], "torch_dtype": "float32"}
    (legacy / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("model.safetensors", "generation_config.json"):
        if not (legacy / name).exists():
            (legacy / name).symlink_to(source / name)
    example = ",".join(str(i) for i in smollm2.tokenizer().encode("Hello world."))
    hf = folder / "hf"
    command = [python, str(Path(__file__).with_name("tp_llm_recipe.py")), str(legacy), str(hf), "--share", str(share),
               "--example", example]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise RuntimeError(f"tp_llm_recipe.py failed: {finished.stderr.strip().splitlines()[-1:]}")
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    smollm2.tokenizer().save_pretrained(hf)
    path = export_relaxed(hf, folder / "onnx")
    done.write_text(json.dumps(result))
    return result | {"path": path}


def export_relaxed(hf: Path, out: Path) -> Path:
    """The genai builder on a pruned Llama folder whose hidden size is not a multiple of its head
    count (Torch-Pruning cuts the hidden size and the heads apart): the attention uses `head_dim`,
    but transformers 5's LlamaConfig refuses such a config, so its check is switched off for the
    builder's run. Returns the path of `model.onnx`."""
    builder = ("import runpy, sys, transformers\n"
               "config = transformers.LlamaConfig\n"
               "config.__class_validators__ = [check for check in config.__class_validators__\n"
               "                               if check.__qualname__ != 'LlamaConfig.validate_architecture']\n"
               f"sys.argv = ['builder', '-m', {str(hf)!r}, '-i', {str(hf)!r}, '-o', {str(out)!r}, '-p', 'fp32', '-e', 'cpu']\n"
               "runpy.run_module('onnxruntime_genai.models.builder', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", builder], capture_output=True, text=True, cwd=out.parent)
    if done.returncode != 0:
        raise RuntimeError(f"onnxruntime-genai builder failed: {done.stderr.strip().splitlines()[-1:]}")
    return out / "model.onnx"


def timings(paths: dict[str, Path], window: np.ndarray, prompt: np.ndarray, tokens: int, rounds: int) -> dict:
    """Prefill seconds (the fastest of 5 runs in every round) and decode tokens/s (best round), every
    model in turn each round: on a shared machine the fastest run is the one least disturbed."""
    prefill: dict[str, list[float]] = {name: [] for name in paths}
    decode: dict[str, float] = {}
    for round_index in range(rounds):
        for name, path in paths.items():
            model = graphprune.load_model(path)
            session = runtime.session(model.to_onnx(), threads=2)
            feeds = causal_feeds(model, window[None, :])
            session.run(None, feeds)
            runs = []
            for _ in range(5):
                start = time.perf_counter()
                session.run(None, feeds)
                runs.append(time.perf_counter() - start)
            prefill[name].append(min(runs))
            del session
            if any("past" in t.name for t in model.graph.inputs):
                rate = decode_rate({name: model}, prompt, tokens, rounds=1)[name]
                decode[name] = max(decode.get(name, 0.0), rate)
            print(f"round {round_index + 1}: {name}: prefill {prefill[name][-1] * 1000:.0f} ms"
                  + (f", decode {decode[name]} tok/s" if name in decode else ""), flush=True)
    return {name: {"prefill_ms": round(min(values) * 1000, 1), "decode_tok_s": decode.get(name)}
            for name, values in prefill.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shares", default="0.1,0.2,0.3,0.5", help="shares of non-embedding parameters removed")
    parser.add_argument("--methods", help="method names separated by ; (default: all; see the docstring)")
    parser.add_argument("--tp", metavar="PYTHON",
                        help="include Torch-Pruning's LLM recipe, run by this Python (an environment with "
                             "transformers==4.48.3 and torch-pruning==1.6.1: see tp_llm_recipe.py)")
    parser.add_argument("--distill-shares", default="0.2")
    parser.add_argument("--calib", type=int, default=32, help="calibration windows of 256 tokens")
    parser.add_argument("--eval", type=int, default=16, help="evaluation windows of each source")
    parser.add_argument("--distill-windows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64, help="decode: tokens generated")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds")
    parser.add_argument("--work", type=Path, default=Path("/tmp/graphprune-llm-quality"),
                        help="where the pruned models are kept")
    parser.add_argument("--only-timing", action="store_true", help="time the models of the rows in --work")
    parser.add_argument("--append", action="store_true", help="add rows to those in --work (no dense rows)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/llm_quality.json"))
    args = parser.parse_args()
    import pydoc_data.topics

    started = time.perf_counter()
    tokenizer = smollm2.tokenizer()
    docs = text_windows("\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)),
                        tokenizer, 256)
    if args.calib + args.distill_windows + args.eval > len(docs):
        raise SystemExit(f"only {len(docs)} windows: calibration and evaluation would overlap")
    held_out = docs[-args.eval:]
    other = text_windows(" ".join(other_sentences()), tokenizer, 256, args.eval)
    prompt = np.asarray([tokenizer(PROMPT)["input_ids"]], np.int64)
    folder = smollm2.cache_dir() / "smollm2"
    genai_path, plain_path = folder / "genai" / "model.onnx", folder / "plain.onnx"
    if not genai_path.is_file():
        smollm2.export_genai(genai_path.parent)
    if not plain_path.is_file():
        smollm2.export_plain(plain_path)
    args.work.mkdir(parents=True, exist_ok=True)
    manifest = args.work / "rows.json"
    rows = json.loads(manifest.read_text()) if args.only_timing or args.append else []
    shares = [float(s) for s in args.shares.split(",")]
    methods = [m for m in (args.methods.split(";") if args.methods else METHODS)
               if args.tp or m != "Torch-Pruning LLM recipe"]

    dense = graphprune.load_model(genai_path)
    dense_params = {"genai": dense.param_count(), "plain": graphprune.load_model(plain_path).param_count()}
    calibration = {"genai": causal_feeds(dense, docs[:args.calib])}

    def measure(model, row: dict) -> None:
        total = model.param_count()
        # Torch-Pruning's recipe also narrows the tied embedding; the share counts the rest
        embedding = 49152 * (HIDDEN - row["config"]["hidden_size"]) if "config" in row else 0
        row |= {"params": total,
                "share_removed": round((dense_params[row["export"]] - total - embedding) / NON_EMBEDDING, 4),
                "ppl_docs": round(perplexity(model, held_out).perplexity, 3),
                "ppl_other": round(perplexity(model, other).perplexity, 3)}
        rows.append(row)
        manifest.write_text(json.dumps(rows, indent=1))
        print({k: v for k, v in row.items() if k != "path"}, flush=True)

    if not args.only_timing and not args.append:
        measure(dense, {"method": "dense", "share": 0.0, "export": "genai", "path": str(genai_path), "seconds": 0.0})
        measure(graphprune.load_model(plain_path), {"method": "dense (plain export)", "share": 0.0, "export": "plain",
                                                    "path": str(plain_path), "seconds": 0.0})
    if not args.only_timing:
        for share in shares:
            for method in methods:
                if " + distill" in method and share not in [float(s) for s in args.distill_shares.split(",")]:
                    continue
                name = f"{method} @ {share:g}".replace(" ", "_").replace(",", "").replace("+", "and")
                row = {"method": method, "share": share, "export": "plain" if method == "block removal" else "genai"}
                start = time.perf_counter()
                if method == "Torch-Pruning LLM recipe":
                    target = args.work / name
                    if not (target / "tp.json").is_file():
                        shutil.rmtree(target, ignore_errors=True)
                    target.mkdir(exist_ok=True)
                    try:
                        made = torch_pruning_llm(share, target, args.tp)
                    except Exception as exc:  # noqa: BLE001 - the peer's failure is a result to report
                        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                        rows.append(row)
                        print(row, flush=True)
                        continue
                    row |= {k: v for k, v in made.items() if k != "path"}
                    row |= {"path": str(made["path"]), "seconds": round(time.perf_counter() - start, 1)}
                    measure(graphprune.load_model(made["path"]), row)
                    continue
                source = plain_path if row["export"] == "plain" else genai_path
                model = graphprune.load_model(source)
                if source == plain_path and "plain" not in calibration:
                    calibration["plain"] = causal_feeds(model, docs[:args.calib])
                feeds = calibration["plain" if source == plain_path else "genai"]
                if method == "block removal":
                    options = {"drop_blocks": blocks_for(share, model.copy(), feeds)}
                else:
                    options = options_for(method.split(" + distill")[0], share)
                if options is None:
                    continue
                report = graphprune.prune(model, calibration=None if method == "l2" else feeds, **options)
                if " + distill" in method:
                    train = causal_feeds(dense, docs[args.calib:args.calib + args.distill_windows])
                    distill(model, dense, train, DistillOptions(epochs=2 if "2 epochs" in method else 1, lr=1e-4, batch=4, loss="kl",
                                                                temperature=1.0, top_k=64))
                path = graphprune.save_model(model, args.work / f"{name}.onnx")
                row |= {"options": options, "verified": report.verified, "path": str(path),
                        "seconds": round(time.perf_counter() - start, 1),
                        "cut": sorted({(g["kind"], g["units_before"], g["units_after"]) for g in report.groups
                                       if g["units_after"] is not None and g["units_after"] < g["units_before"]})}
                if method == "block removal":
                    row["blocks_dropped"] = [b["block"] for p in report.passes if p.name == "drop-blocks"
                                             for b in p.stats["blocks_dropped"]]
                measure(model, row)
    if not args.rounds:
        print(f"measured {len(rows)} rows into {manifest}; time them with --only-timing")
        return
    paths = {f"{row['method']} @ {row['share']:g}": Path(row["path"]) for row in rows if "path" in row}
    timed = timings(paths, held_out[0], prompt, args.tokens, args.rounds)
    reference = {"genai": timed["dense @ 0"], "plain": timed["dense (plain export) @ 0"]}
    for row in rows:
        if "path" not in row:
            continue
        figures = timed[f"{row['method']} @ {row['share']:g}"]
        base = reference[row["export"]]
        row |= figures
        row["prefill_speedup"] = round(base["prefill_ms"] / figures["prefill_ms"], 3)
        if figures["decode_tok_s"] and base["decode_tok_s"]:
            row["decode_speedup"] = round(figures["decode_tok_s"] / base["decode_tok_s"], 3)
    setup = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"}
    setup |= {"minutes": round((time.perf_counter() - started) / 60, 1), "non_embedding_params": NON_EMBEDDING}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"setup": setup, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
