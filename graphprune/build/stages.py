"""The stages of a build, one function each: read the parent stage's model, write `model.onnx` into
the stage's folder, return what it did (JSON-able stats).

export → prune (+ reconstruct) → recover (distill) → fuse → quantize; then verify and bench read
every model. A stage knows nothing of caching: `runner` calls it only when its key is new.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphprune.build.config import BuildConfig
from graphprune.build.data import Data, load_data
from graphprune.errors import GraphpruneError
from graphprune.ir.model import first_line, load_model, model_bytes, save_model

logger = logging.getLogger(__name__)

MODEL = "model.onnx"
#: files a Hugging Face runtime reads beside the model; carried into the output folder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json")


class StageError(GraphpruneError):
    """A stage cannot run with what it was given."""


@dataclass
class Context:
    """What stages share: the config, the source's folders, the dense model, data by spec."""

    config: BuildConfig
    dense: Path | None = None  # the exported (or given) ONNX model
    prune_report: Path | None = None  # the prune stage's report, for a stage that reads a pruned model
    show: Callable[[str], None] = lambda text: None  # a running stage's progress line
    _data: dict[tuple[str, int], Data] = field(default_factory=dict)

    @property
    def hf_folder(self) -> Path | None:
        """The folder with config.json and the tokenizer: a Hugging Face model's, or an Optimum export's."""
        source = self.config["source"]
        value = source.get("hf") if source.get("hf") is not None else source.get("optimum")
        return None if value is None else Path(self.value_of(value))

    def source_model(self) -> Path | None:
        """The source's ONNX model (an ONNX or Optimum source; None where the build exports one)."""
        source = self.config["source"]
        if source.get("onnx") is not None:
            return Path(self.value_of(source["onnx"]))
        if source.get("optimum") is not None:
            folder = Path(self.value_of(source["optimum"]))
            if not (folder / MODEL).is_file():
                raise StageError(f"[source] optimum: {folder} has no {MODEL}")
            return folder / MODEL
        return None

    @property
    def tokenizer(self) -> str | None:
        given = self.config["source"].get("tokenizer")
        if given is not None:
            return str(self.value_of(given))
        return None if self.hf_folder is None else str(self.hf_folder)

    def value_of(self, value: str | dict) -> str | Path:
        """A source path as written, or the result of `{ call = "module:function" }`."""
        if isinstance(value, dict):
            from graphprune.torch.frontend import load_factory  # resolves MODULE:FUNCTION (no torch import)

            return str(load_factory(value["call"])())
        return self.config.resolve(value)

    def data(self, which: str, model: Path) -> Data:
        """The calibration or evaluation data, fitted to `model`'s inputs (cached per model file)."""
        spec = self.config["data"][which]
        samples = self.config["data"]["samples" if which == "calibration" else "eval_samples"]
        key = (f"{which}:{model}", samples)
        if key not in self._data:
            self._data[key] = load_data(spec, model, samples, self.config["data"]["seq"], self.config.folder,
                                        self.tokenizer, seed=self.config["build"]["seed"] + (which == "evaluation"),
                                        causal=self.causal(model))
        return self._data[key]

    def causal(self, model: Path) -> bool:
        """Whether `model` is a causal LM: its source says so, or it has a KV cache."""
        export = self.config["export"] if self.config.has("export") else None
        if export is not None and (export["exporter"] in ("genai", "optimum") or
                                   (export["task"] or "").startswith("text-generation")):
            return True
        folder = self.hf_folder
        if folder is not None and (folder / "config.json").is_file() and \
                _task_of(json.loads((folder / "config.json").read_text())) == "text-generation":
            return True
        from graphprune.analysis.state import cache_pairs

        return bool(cache_pairs(load_model(model)))


# -- export ------------------------------------------------------------------------------------------
def export(ctx: Context, parent: Path | None, folder: Path) -> dict[str, Any]:
    """A PyTorch model (a factory, or a Hugging Face folder) to ONNX."""
    from graphprune.torch.frontend import from_torch, load_factory

    source, options = ctx.config["source"], ctx.config["export"] if ctx.config.has("export") else None
    exporter = options["exporter"] if options else "dynamo"
    if exporter in ("genai", "optimum"):
        assert options is not None and ctx.hf_folder is not None  # the config check asks for both
        _export_decoder(ctx.hf_folder, folder, options)
        model = load_model(folder / MODEL)
        return {"exporter": exporter, "inputs": {t.name: list(t.shape) for t in model.graph.inputs
                                                 if not t.name.startswith("past_key_values")},
                "kv_cache": any(t.name.startswith("past_key_values") for t in model.graph.inputs)}
    if source.get("factory") is not None:
        import torch

        torch.manual_seed(ctx.config["build"]["seed"])  # a factory's random weights are part of its content
        module = load_factory(source["factory"])(**source["kwargs"])
        module, example, names = _factory_inputs(module, options)
        axes = options.get("dynamic_axes") if options else None
        model = from_torch(module.eval(), example, input_names=names, exporter=exporter,
                           dynamic_axes=[0] if axes is None else axes, opset=options.get("opset") if options else None)
    else:
        module, example, names = _hf_module(ctx, options)
        axes = options.get("dynamic_axes") if options else None
        model = from_torch(module, example, input_names=names, exporter=exporter,
                           dynamic_axes=[0, 1] if axes is None else axes,
                           opset=options.get("opset") if options else None)
    save_model(model, folder / MODEL)
    return {"exporter": exporter, "inputs": {t.name: list(t.shape) for t in model.graph.inputs}}


def _export_decoder(hf_folder: Path, folder: Path, options: Any) -> None:
    """A decoder with a KV cache: onnxruntime-genai's model builder (GroupQueryAttention, genai_config.json
    beside the model) or Optimum's exporter (`--task text-generation-with-past`), in the interpreter
    `[export] python` names (Optimum pins its own transformers; keep it in a venv of its own)."""
    import subprocess
    import sys

    if options["exporter"] == "genai":
        from graphprune.models.genai import genai_export

        genai_export(hf_folder, folder, options["precision"])
        return
    python = options["python"] or sys.executable
    task = options["task"] or "text-generation-with-past"
    command = [python, "-m", "optimum.exporters.onnx", "--model", str(hf_folder), "--task", task, str(folder)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not (folder / MODEL).is_file():
        tail = (done.stderr.strip().splitlines() or ["no model.onnx written"])[-1]
        raise StageError(f"optimum export with {python} failed: {tail}")
    if not (folder / "tokenizer_config.json").is_file():  # an older transformers could not read it
        copy_tokenizer(hf_folder, folder)
        portable_tokenizer(folder, causal=True)


def _factory_inputs(module: Any, options: Any) -> tuple[Any, tuple, list[str] | None]:
    import torch

    if isinstance(module, tuple) and len(module) == 2:
        module, example = module
        return module, tuple(example), getattr(module, "input_names", None)
    shapes = options["inputs"] if options else {}
    if shapes:
        generator = torch.Generator().manual_seed(0)
        return module, tuple(torch.randn(shape, generator=generator) for shape in shapes.values()), list(shapes)
    if hasattr(module, "example_inputs"):
        return module, tuple(module.example_inputs()), getattr(module, "input_names", None)
    raise StageError("the factory's module has no example_inputs(): give [export] inputs = { name = [shape] }")


def _hf_module(ctx: Context, options: Any) -> tuple[Any, tuple, list[str]]:
    """The Hugging Face model of the source folder as a module of plain tensors, by task."""
    import torch

    from graphprune.calib import load_tokenizer
    from graphprune.tools.text import english_sentences

    folder = ctx.hf_folder
    assert folder is not None
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    task = (options.get("task") if options else None) or _task_of(config)
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if task == "image-classification":
        model = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
        size = config.get("image_size", 224)
        return _wrapped(model, "logits", "pixel_values"), (torch.randn(2, config.get("num_channels", 3), size, size),), \
            ["pixel_values"]
    seq = options["example_seq"] if options else 16
    tokenizer = ctx.tokenizer
    assert tokenizer is not None  # an hf source is a folder with its tokenizer
    encoded = load_tokenizer(tokenizer)(list(english_sentences()[:2]), padding="max_length",
                                            truncation=True, max_length=seq, return_tensors="pt")
    names = ["input_ids", "attention_mask"]
    example = tuple(encoded[name].to(torch.int64) for name in names)
    if task == "text-generation":
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        model.config.use_cache = False
        return _wrapped(model, "logits", *names), example, names
    model = transformers.AutoModel.from_pretrained(folder).eval()
    return _wrapped(model, "last_hidden_state", *names), example, names


def _task_of(config: dict) -> str:
    architectures = " ".join(config.get("architectures", []))
    if "CausalLM" in architectures:
        return "text-generation"
    if "ImageClassification" in architectures:
        return "image-classification"
    return "feature-extraction"


def _wrapped(model: Any, attribute: str, *names: str) -> Any:
    """`model` as a module of plain tensors: `forward(<names>) -> model(**inputs).<attribute>`
    (explicit parameters: torch.export matches dynamic shapes to them)."""
    import torch

    class Text(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask), attribute)

    class Image(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return getattr(self.model(pixel_values=pixel_values), attribute)

    return (Image() if names == ("pixel_values",) else Text()).eval()


# -- prune -------------------------------------------------------------------------------------------
def prune(ctx: Context, parent: Path | None, folder: Path) -> dict[str, Any]:
    """Remove units (any `graphprune prune` option), with the least-squares refit when [recover] asks."""
    from graphprune import api

    assert parent is not None
    options = {k: v for k, v in ctx.config["prune"].options.items() if v is not None}
    pipeline = options.pop("pipeline", None)
    reconstruct = ctx.config.has("recover") and ctx.config["recover"]["reconstruct"]
    model = load_model(parent)
    needs_data = reconstruct or options.get("importance", "l2") not in ("l1", "l2", "random") or pipeline
    calibration = ctx.data("calibration", parent) if needs_data else None
    feeds = None if calibration is None else calibration.feeds
    labels = None if calibration is None else calibration.labels
    def show(name: str, index: int, total: int) -> None:
        ctx.show(f"pass {index + 1}/{total}: {name}")

    if pipeline is not None:
        report = api.prune(model, pipeline, calibration=feeds, labels=labels, seed=ctx.config["build"]["seed"],
                           progress=show)
    else:
        report = api.prune(model, calibration=feeds, labels=labels, reconstruct=reconstruct,
                           seed=ctx.config["build"]["seed"], progress=show, **options)
    save_model(model, folder / MODEL)
    (folder / "prune-report.json").write_text(json.dumps(report.to_json(), indent=1))
    return {"params_before": report.params_before, "params_after": report.params_after,
            "calibration": None if calibration is None else calibration.description, "reconstruct": reconstruct}


# -- recover -----------------------------------------------------------------------------------------
def recover(ctx: Context, parent: Path | None, folder: Path) -> dict[str, Any]:
    """Knowledge distillation: train the pruned model to match the dense one on the calibration data."""
    from graphprune.torch.distill import DistillOptions, distill, verify_student

    assert parent is not None and ctx.dense is not None
    student, teacher = load_model(parent), load_model(ctx.dense)
    calibration = ctx.data("calibration", ctx.dense)
    options = DistillOptions(**ctx.config["recover"]["distill"], seed=ctx.config["build"]["seed"])
    result = distill(student, teacher, calibration.feeds, options,
                     progress=lambda step, total, loss: ctx.show(f"step {step}/{total}, loss {loss:.4g}"))
    verify_student(student, teacher, calibration.feeds)
    save_model(student, folder / MODEL)
    return result.to_json() | {"data": calibration.description}


# -- fuse --------------------------------------------------------------------------------------------
def fuse(ctx: Context, parent: Path | None, folder: Path) -> dict[str, Any]:
    """ONNX Runtime's transformer optimizer, told the head count the pruned graph has (when every
    layer keeps the same; otherwise it reads each layer's from the graph)."""
    from onnxruntime.transformers.optimizer import optimize_model

    assert parent is not None
    options = ctx.config["fuse"]
    hf_config = _hf_config(ctx)
    model_type = options["model_type"] or _ort_model_type(hf_config.get("model_type"))
    heads, hidden = _head_count(ctx.prune_report, hf_config)
    optimized = optimize_model(str(parent), model_type=model_type, num_heads=heads, hidden_size=hidden,
                               opt_level=options["opt_level"],
                               provider="cuda" if ctx.config["build"]["provider"] == "cuda" else None)
    fused = {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}
    optimized.save_model_to_file(str(folder / MODEL), use_external_data_format=_large(parent))
    return {"model_type": model_type, "num_heads": heads, "hidden_size": hidden, "fused": fused}


def _hf_config(ctx: Context) -> dict:
    folder = ctx.hf_folder
    path = None if folder is None else folder / "config.json"
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def _ort_model_type(hf_type: str | None) -> str:
    from onnxruntime.transformers.optimizer import MODEL_TYPES

    return hf_type if hf_type is not None and hf_type in MODEL_TYPES else "bert"


def _head_count(prune_report: Path | None, hf_config: dict) -> tuple[int, int]:
    """(heads, attention width) for the optimizer: the pruned counts when every layer keeps the
    same, (0, 0) to have it read each layer's from the graph."""
    heads = hf_config.get("num_attention_heads", 0)
    hidden = hf_config.get("hidden_size", 0)
    if prune_report is None or not heads:
        return heads, hidden
    from graphprune.tools.configs import ConfigError, pruned_sizes

    try:
        sizes = pruned_sizes(json.loads(prune_report.read_text()), hf_config)
    except ConfigError:  # layers differ
        return 0, 0
    head_dim = hf_config.get("head_dim") or hidden // heads
    heads = sizes.get("num_attention_heads", heads)
    return heads, heads * head_dim


def _large(path: Path) -> bool:
    return model_bytes(path) > 1 << 30


# -- quantize ----------------------------------------------------------------------------------------
def quantize(ctx: Context, parent: Path | None, folder: Path) -> dict[str, Any]:
    """ONNX Runtime INT8: dynamic (weights now, activations at run time) or static QDQ (activation
    ranges from the calibration data)."""
    assert parent is not None
    out = folder / MODEL
    large = _large(parent)
    activations = ctx.config["quantize"]["mode"] != "weight-only"  # pre-processing serves activation ranges
    prepared = _pre_process(parent, folder / "prepared.onnx", large) if activations else None
    source = prepared or parent
    try:
        with _without_advice():
            return _quantize(ctx, source, out, large) | {"pre_processed": prepared is not None}
    finally:
        for scratch in folder.glob("prepared.onnx*"):
            scratch.unlink()


@contextlib.contextmanager
def _without_advice():
    """Drop the quantizer's advice to pre-process (logged on the root logger): done where it can run."""
    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider to run pre-processing")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _pre_process(model: Path, target: Path, large: bool) -> Path | None:
    """ONNX Runtime's recommended step before quantizing (shape inference, basic graph optimizations);
    None when it cannot run on this graph (the quantizer then reads the model as it is)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:  # ONNX shape inference: ORT's symbolic one gives up on dynamic shapes past fused ops
        quant_pre_process(str(model), str(target), skip_symbolic_shape=True, save_as_external_data=large)
    except Exception as exc:  # noqa: BLE001 - optional step; the reason is logged
        logger.info("quantization pre-processing skipped: %s", first_line(exc))
        return None
    return target


def _quantize(ctx: Context, parent: Path, out: Path, large: bool) -> dict[str, Any]:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    options = ctx.config["quantize"]
    if options["mode"] == "weight-only":
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        bits, block = options["bits"], options["block_size"]
        quantizer = MatMulNBitsQuantizer(onnx.load(str(parent)), bits=bits, block_size=block, is_symmetric=True,
                                         algo_config=DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True,
                                                                                  bits=bits))
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=large)
        return {"mode": "weight-only", "weights": f"int{bits}, blocks of {block}"}
    if options["mode"] == "dynamic":
        quantize_dynamic(str(parent), str(out), weight_type=QuantType.QInt8, per_channel=options["per_channel"],
                         reduce_range=options["reduce_range"], use_external_data_format=large)
        return {"mode": "dynamic", "weights": "int8"}
    calibration = ctx.data("calibration", parent)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[options["method"]]
    count = min(options["samples"], len(next(iter(calibration.feeds.values()))))
    quantize_static(str(parent), str(out), _Reader(calibration.feeds, count), quant_format=QuantFormat.QDQ,
                    per_channel=options["per_channel"], reduce_range=options["reduce_range"],
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                    use_external_data_format=large)
    for leftover in out.parent.glob("augmented_model*.onnx"):
        leftover.unlink()
    return {"mode": "static QDQ", "method": options["method"], "calibration": f"{count} of "
            f"{calibration.description}"}


class _Reader:
    """ONNX Runtime's CalibrationDataReader over calibration feeds, one sample per run."""

    def __init__(self, feeds: dict[str, np.ndarray], count: int) -> None:
        self._rows = iter([{name: array[i:i + 1] for name, array in feeds.items()} for i in range(count)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._rows, None)


#: the model stages: name -> function
MODEL_STAGE_FUNCTIONS = {"export": export, "prune": prune, "recover": recover, "fuse": fuse, "quantize": quantize}


def portable_tokenizer(folder: Path, causal: bool = False) -> None:
    """Name the tokenizer class as transformers 4.x knows it (5 writes `TokenizersBackend`), so that
    Optimum's environment reads the folder too; a causal LM's tokenizer gives only the inputs its
    model takes (otherwise `generate` refuses the `token_type_ids` it would add)."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    settings = json.loads(path.read_text())
    changed = dict(settings)
    if settings.get("tokenizer_class") == "TokenizersBackend":
        changed["tokenizer_class"] = "PreTrainedTokenizerFast"
    if causal:
        changed["model_input_names"] = ["input_ids", "attention_mask"]
    if changed != settings:
        path.write_text(json.dumps(changed, indent=2) + "\n")


def copy_tokenizer(source: Path | None, target: Path) -> list[str]:
    """Carry the tokenizer (and generation) files of a Hugging Face folder into the output folder."""
    if source is None:
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied
