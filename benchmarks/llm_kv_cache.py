"""SmolLM2 with a KV cache (the onnxruntime-genai builder's graph): KV heads and FFN neurons pruned,
the cache resized, greedy generation in ONNX Runtime; and the dead-head check.

    pip install -c constraints.txt -e '.[llm,test]'
    python benchmarks/llm_kv_cache.py [--calib 32] [--eval 16] [--tokens 64]
        [--out benchmarks/results/llm_kv_cache.json]

1. Pruned: `--ratio 0.2 --head-ratio 0.34 --importance obs --reconstruct` (one KV head of 3 and its
   3 query heads, 20% of the FFN neurons, in every layer) on the first `--calib` 256-token windows
   of Python's documentation; perplexity on its last `--eval` windows and on windows of other
   sources (`models/minilm.other_sentences()`); the cache inputs/outputs' declared shapes; greedy
   generation of `--tokens` tokens from one prompt, dense and pruned, decode tokens/s timed in turns.
2. Dead heads: KV head 1 of every layer zeroed (its K/V and its query heads' Q columns, and their
   output-projection rows); `--threshold 0` removes it; greedy generation of `--tokens` tokens must
   give the same tokens as the unpruned dead-head model, and logits within 1e-4 relative.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import graphprune
from graphprune import runtime
from graphprune.models import smollm2
from graphprune.models.minilm import other_sentences
from graphprune.testing import kill_units
from graphprune.tools.generate import decode_rate, greedy
from graphprune.tools.perplexity import causal_feeds, perplexity, text_windows

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def cache_shapes(model) -> dict[str, list]:
    return {t.name: list(t.shape) for t in [*model.graph.inputs, *model.graph.outputs]
            if "past" in t.name or "present" in t.name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--eval", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/llm_kv_cache.json"))
    args = parser.parse_args()
    import pydoc_data.topics

    started = time.perf_counter()
    folder = smollm2.cache_dir() / "smollm2" / "genai"
    path = folder / "model.onnx"
    if not path.is_file():
        smollm2.export_genai(folder)
    tokenizer = smollm2.tokenizer()
    docs = text_windows("\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)),
                        tokenizer, 256)
    held_out, other = docs[-args.eval:], text_windows(" ".join(other_sentences()), tokenizer, 256, args.eval)
    prompt = np.asarray([tokenizer(PROMPT)["input_ids"]], np.int64)
    result: dict = {"setup": {k: v for k, v in vars(args).items() if k != "out"}, "prompt": PROMPT}

    dense = graphprune.load_model(path)
    pruned = graphprune.load_model(path)
    calibration = causal_feeds(pruned, docs[:args.calib], runtime.implied_dims(pruned.to_onnx()))
    start = time.perf_counter()
    report = graphprune.prune(pruned, ratio=0.2, head_ratio=0.34, importance="obs", reconstruct=True,
                              calibration=calibration)
    seconds = time.perf_counter() - start
    dense_tokens, _ = greedy(dense, prompt, args.tokens)
    pruned_tokens, _ = greedy(pruned, prompt, args.tokens)
    result["pruned"] = {
        "seconds": round(seconds, 1), "verified": report.verified,
        "params": [report.params_before, report.params_after],
        "cut": sorted({(g["kind"], g["units_before"], g["units_after"]) for g in report.groups
                       if g["units_after"] is not None and g["units_after"] < g["units_before"]}),
        "cache_shapes_dense": cache_shapes(dense), "cache_shapes_pruned": cache_shapes(pruned),
        "ppl_docs": [round(perplexity(m, held_out).perplexity, 3) for m in (dense, pruned)],
        "ppl_other": [round(perplexity(m, other).perplexity, 3) for m in (dense, pruned)],
        "dense_text": tokenizer.decode(dense_tokens[0]), "pruned_text": tokenizer.decode(pruned_tokens[0]),
        "decode_tokens_per_s": decode_rate({"dense": dense, "pruned": pruned}, prompt, args.tokens),
    }
    print(json.dumps(result["pruned"], indent=1), flush=True)

    dead = graphprune.load_model(path)
    dead.infer_shapes()
    kill_units(dead, lambda g: {1} if g.kind == "head" else set())
    reference = dead.copy()
    report = graphprune.prune(dead, threshold=0.0)
    tokens, logits = greedy(reference, prompt, args.tokens)
    dead_tokens, dead_logits = greedy(dead, prompt, args.tokens)
    result["dead_heads"] = {
        "verified": report.verified, "params": [report.params_before, report.params_after],
        "cache_shapes": cache_shapes(dead),
        "same_tokens": bool(np.array_equal(tokens, dead_tokens)),
        "max_relative_logit_diff": float(runtime.max_relative_diff(logits, dead_logits)),
    }
    print(json.dumps(result["dead_heads"], indent=1), flush=True)
    result["setup"]["minutes"] = round((time.perf_counter() - started) / 60, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
