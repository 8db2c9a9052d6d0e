"""SmolLM2-135M after pruning: perplexity on held-out text, first look (issue 14 extends it).

    pip install -c constraints.txt -e '.[llm]'
    python benchmarks/llm_quality.py [--ratio 0.2] [--calib 32] [--eval 16]
        [--out benchmarks/results/llm_quality.json]

The default export (SDPA, dynamo, no cache). Text: Python's bundled documentation
(`pydoc_data.topics`) as one token stream in windows of 256; calibration: the first `--calib`
windows; evaluation: the last `--eval` windows of the documentation (never calibrated on) and
`--eval` windows of other sources (`models/minilm.other_sentences()`: scikit-learn's data-set
descriptions and the system's licence texts). Perplexity as `graphprune eval` computes it.
Variants at `--ratio`: magnitude (l2), activation (= Wanda-sp), FLAP (fluctuation metric and bias
compensation) and its metric alone, activation with `--round-mode down` (then one of the 3 KV
heads of every layer goes), and the same with `--gqa query` (one query head of each KV head);
obs + reconstruct (one sequential pass), alone and with a third of the KV heads or of the query
heads (`--head-ratio 0.34`); obs + reconstruct then distilled (`graphprune.distill`: next-token KL
over the teacher's top 64, temperature 1, one epoch, batch 4, lr 1e-4) on the `--distill-windows`
windows after the calibration ones, never evaluated on.
`--only "A;B"` reruns those variants and keeps the other rows of `--out`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import graphprune
from graphprune.distill import DistillOptions, distill
from graphprune.models import smollm2
from graphprune.models.minilm import other_sentences
from graphprune.perplexity import causal_feeds, perplexity, text_windows


def variants(ratio: float) -> dict[str, dict]:
    return {
        "l2": {"ratio": ratio, "importance": "l2"},
        "activation (wanda-sp)": {"ratio": ratio, "importance": "activation"},
        "flap (fluctuation + bias compensation)": {"ratio": ratio, "importance": "flap"},
        "flap fluctuation only": {"pipeline": f"unshare,deps,importance{{kind=flap}},prune{{ratio={ratio}}},"
                                              "cleanup,verify"},
        "activation, round down": {"ratio": ratio, "importance": "activation", "round_mode": "down"},
        "activation, gqa query, round down": {"ratio": ratio, "importance": "activation", "round_mode": "down",
                                              "gqa": "query"},
        "obs + reconstruct": {"ratio": ratio, "importance": "obs", "reconstruct": True},
        "obs + reconstruct, KV heads 3 -> 2": {"ratio": ratio, "head_ratio": 0.34, "importance": "obs",
                                               "reconstruct": True},
        "obs + reconstruct, query heads 9 -> 6": {"ratio": ratio, "head_ratio": 0.34, "importance": "obs",
                                                  "reconstruct": True, "gqa": "query"},
        "obs + reconstruct + distill": {"ratio": ratio, "importance": "obs", "reconstruct": True, "distill": True},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--calib", type=int, default=32, help="calibration windows of 256 tokens")
    parser.add_argument("--eval", type=int, default=16, help="evaluation windows of each source")
    parser.add_argument("--distill-windows", type=int, default=64,
                        help="training windows for the distilled variant (after the calibration windows)")
    parser.add_argument("--only", help="variant names separated by ;: run those (and dense) and replace "
                                       "their rows in --out, keeping the others")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/llm_quality.json"))
    args = parser.parse_args()
    import pydoc_data.topics

    tokenizer = smollm2.tokenizer()
    docs = text_windows("\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)),
                        tokenizer, 256)
    if args.calib + args.distill_windows + args.eval > len(docs):
        raise SystemExit(f"only {len(docs)} windows: calibration and evaluation would overlap")
    held_out = docs[-args.eval:]
    other = text_windows(" ".join(other_sentences()), tokenizer, 256, args.eval)
    started = time.perf_counter()
    folder = smollm2.cache_dir() / "smollm2"
    dense_path = folder / "plain.onnx"
    if not dense_path.is_file():
        smollm2.export_plain(dense_path)
    dense = graphprune.load_model(dense_path)
    calibration = causal_feeds(dense, docs[:args.calib], {})
    rows = []

    def score(model, name: str, seconds: float, report=None) -> None:
        row = {"variant": name, "params": model.param_count(),
               "ppl_docs": round(perplexity(model, held_out).perplexity, 3),
               "ppl_other": round(perplexity(model, other).perplexity, 3), "seconds": round(seconds, 1)}
        if report is not None:
            row["cut"] = sorted({(g["kind"], g["units_before"], g["units_after"]) for g in report.groups
                                 if g["units_after"] is not None and g["units_after"] < g["units_before"]})
        rows.append(row)
        print(row, flush=True)

    score(dense, "dense", 0.0)
    chosen = variants(args.ratio)
    if args.only:
        chosen = {name: chosen[name] for name in args.only.split(";")}
    for name, options in chosen.items():
        model = graphprune.load_model(dense_path)
        start = time.perf_counter()
        options = dict(options)
        distilled = options.pop("distill", False)
        report = graphprune.prune(model, calibration=None if options.get("importance") == "l2" else calibration,
                                  **options)
        if distilled:  # next-token KL (teacher's top 64) on the windows after the calibration ones
            train = causal_feeds(dense, docs[args.calib:args.calib + args.distill_windows], {})
            distill(model, dense, train, DistillOptions(epochs=1, lr=1e-4, batch=4, loss="kl", temperature=1.0,
                                                        top_k=64))
        score(model, name, time.perf_counter() - start, report)
    if args.only and args.out.is_file():  # the other variants' rows stay as measured before
        fresh = {row["variant"] for row in rows}
        rows = [row for row in json.loads(args.out.read_text())["rows"] if row["variant"] not in fresh] + rows
    setup = {k: v for k, v in vars(args).items() if k != "out"}
    setup["minutes"] = round((time.perf_counter() - started) / 60, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
