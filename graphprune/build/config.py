"""A build config (TOML): which stages run, with which options; every key checked on load.

An invalid config raises `ConfigKeyError`, whose one-line message names the file, the key and
what is wrong with it (`build.toml: [prune] ratio: must be in [0, 1), got 1.5`).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphprune.errors import GraphpruneError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the same parser, from PyPI
    import tomli as tomllib

#: the stages that produce a model, in the order they run
MODEL_STAGES = ("export", "prune", "recover", "fuse", "quantize")
#: every section a config may have
SECTIONS = ("build", "source", "data", *MODEL_STAGES, "verify", "bench", "report")

#: onnx: a file; hf: a Hugging Face model folder; factory: MODULE:FUNCTION giving a torch module;
#: optimum: an Optimum export folder (model.onnx beside config.json and the tokenizer)
SOURCE_KINDS = ("onnx", "hf", "factory", "optimum")
#: dynamo / torchscript: torch.onnx.export; genai: onnxruntime-genai's model builder (a decoder with a
#: KV cache, GroupQueryAttention); optimum: `optimum.exporters.onnx` (run by [export] python)
EXPORTERS = ("dynamo", "torchscript", "genai", "optimum")
TASKS = ("feature-extraction", "image-classification", "text-generation", "text-generation-with-past")
#: dynamic: INT8 weights and run-time activation scales (MatMulInteger); static: QDQ INT8 with calibrated
#: activation ranges; weight-only: MatMulNBits (8- or 4-bit weights in blocks, activations stay float:
#: what LLM deployments run)
QUANT_MODES = ("dynamic", "static", "weight-only")
QUANT_METHODS = ("minmax", "entropy", "percentile")
METRICS = ("auto", "cosine", "agreement", "accuracy", "perplexity")
PROVIDERS = ("cpu", "cuda")
DATA_KINDS = ("pydoc", "other-english", "text", "npz", "photos", "digits", "random")


class ConfigKeyError(GraphpruneError):
    """A build config key is unknown, missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class Section:
    """One section's options: the keys given (checked), with the defaults filled in."""

    name: str
    options: dict[str, Any]
    given: frozenset[str] = frozenset()  # the keys the config wrote (the rest are defaults)

    def __getitem__(self, key: str) -> Any:
        return self.options[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)


@dataclass(frozen=True)
class BuildConfig:
    path: Path  # the config file; relative paths in it are relative to its folder
    sections: dict[str, Section] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.path.parent

    def has(self, name: str) -> bool:
        return name in self.sections

    def __getitem__(self, name: str) -> Section:
        return self.sections[name]

    @property
    def output(self) -> Path:
        return self.resolve(self["build"]["output"])

    @property
    def cache(self) -> Path:
        """Where stages keep their results: beside the output folder (`.<output>.stages`), not in it,
        which holds only what the runtime loads (Optimum searches it for .onnx files); a sweep's
        variants share one."""
        given = self["build"]["cache"]
        return self.output.with_name(f".{self.output.name}.stages") if given is None else self.resolve(given)

    def resolve(self, value: str | Path) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.folder / path


def _prune_keys() -> dict[str, Any]:
    """The prune stage takes every option of `graphprune prune` (the API's build_passes), plus a
    pass pipeline text."""
    from graphprune.api import build_passes

    keys = {name: p.default for name, p in inspect.signature(build_passes).parameters.items()
            if name not in ("reconstruct", "seed")}
    return keys | {"pipeline": None}


#: the distill options (graphprune.torch.distill.DistillOptions' fields, listed here so that a config
#: checks without torch)
DISTILL_KEYS = ("epochs", "lr", "batch", "loss", "temperature", "top_k", "hidden")


#: section -> key -> default (None: optional, no default). `_check` below adds the value checks.
def _defaults() -> dict[str, dict[str, Any]]:
    return {
        "build": {"output": None, "cache": None, "provider": "cpu", "seed": 0, "threads": 2, "external_data_mb": 1024},
        "source": {"onnx": None, "hf": None, "factory": None, "optimum": None, "kwargs": {}, "tokenizer": None},
        "export": {"exporter": "dynamo", "task": None, "inputs": {}, "dynamic_axes": None, "opset": None,
                   "example_seq": 16, "python": None, "precision": "fp32"},
        "data": {"calibration": "random", "evaluation": "random", "samples": 64, "eval_samples": 64,
                 "seq": 128, "labels": None},
        "prune": _prune_keys(),
        "recover": {"reconstruct": False, "distill": None},
        "fuse": {"model_type": None, "opt_level": 0},
        "quantize": {"mode": "dynamic", "per_channel": False, "method": "minmax", "samples": 32,
                     "reduce_range": False, "bits": 8, "block_size": 32},
        "verify": {"metric": "auto", "min_quality": None, "max_perplexity_ratio": None},
        "bench": {"batch": 1, "runs": 30, "repeats": 3, "warmup": 3, "threads": None},
        "report": {"title": None},
    }


def read_toml(path: Path) -> dict[str, Any]:
    """The config file as parsed TOML; a missing or malformed file is a one-line ConfigKeyError."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigKeyError(f"{path}: no such build config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigKeyError(f"{path}: cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigKeyError(f"{path.name}: not valid TOML: {exc}") from None


def load_config(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> BuildConfig:
    """Read and check a build config. `overrides` (section -> key -> value) win over the file's
    values, as if written there (the Python API's way to vary one key)."""
    path = Path(path)
    raw = read_toml(path)
    if "sweep" in raw:
        raise ConfigKeyError(f"{path.name}: has a [sweep] (several builds): run it with `graphprune build` or "
                             "graphprune.build.sweep.run_sweep")
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    return parse_config(raw, path)


def parse_config(raw: dict[str, Any], path: Path) -> BuildConfig:
    defaults = _defaults()
    name = path.name
    sections: dict[str, Section] = {}
    for section, values in raw.items():
        if section not in defaults:
            raise ConfigKeyError(f"{name}: unknown section [{section}] (sections: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigKeyError(f"{name}: {section} must be a [{section}] table, got {values!r}")
        known = defaults[section]
        for key in values:
            if key not in known:
                raise ConfigKeyError(f"{name}: [{section}] unknown key '{key}' (keys: {', '.join(known)})")
        sections[section] = Section(section, known | values, frozenset(values))
    if "source" not in sections:
        raise ConfigKeyError(f"{name}: [source] is missing: give onnx, hf, factory or optimum")
    for always in ("build", "data", "verify", "report"):
        sections.setdefault(always, Section(always, defaults[always]))
    if sections["build"]["output"] is None:
        build = sections["build"]
        sections["build"] = Section("build", build.options | {"output": f"{path.stem}-build"}, build.given)
    config = BuildConfig(path.resolve(), sections)
    _check(config, name)
    return config


def _fail(name: str, section: str, key: str, problem: str) -> ConfigKeyError:
    return ConfigKeyError(f"{name}: [{section}] {key}: {problem}")


def _check_type(name: str, section: Section, key: str, kind: type | tuple[type, ...], what: str) -> None:
    value = section.get(key)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if value is None:
        return
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # True is an int
        raise _fail(name, section.name, key, f"must be {what}, got {value!r}")


def _check_choice(name: str, section: Section, key: str, choices: tuple[str, ...]) -> None:
    value = section.get(key)
    if value is not None and value not in choices:
        raise _fail(name, section.name, key, f"must be one of {', '.join(choices)}, got {value!r}")


def _check_positive(name: str, section: Section, *keys: str) -> None:
    for key in keys:
        _check_type(name, section, key, int, "a whole number")
        value = section.get(key)
        if value is not None and value < 1:
            raise _fail(name, section.name, key, f"must be at least 1, got {value}")


def _check(config: BuildConfig, name: str) -> None:
    build = config["build"]
    _check_type(name, build, "output", str, "a folder path")
    _check_type(name, build, "cache", str, "a folder path")
    _check_choice(name, build, "provider", PROVIDERS)
    _check_type(name, build, "seed", int, "a whole number")
    _check_positive(name, build, "threads", "external_data_mb")

    source = config["source"]
    given = [kind for kind in SOURCE_KINDS if source.get(kind) is not None]
    if len(given) != 1:
        raise _fail(name, "source", "onnx/hf/factory/optimum",
                    f"give exactly one of onnx, hf, factory, optimum (got {', '.join(given) or 'none'})")
    for key in (*SOURCE_KINDS, "tokenizer"):
        value = source.get(key)
        if value is not None and not isinstance(value, str) and not (isinstance(value, dict) and
                                                                     set(value) == {"call"}):
            raise _fail(name, "source", key, f"must be a path or {{ call = \"module:function\" }}, got {value!r}")
    if source.get("factory") is not None and ":" not in str(source["factory"]):
        raise _fail(name, "source", "factory", f"must be MODULE:FUNCTION, got {source['factory']!r}")
    _check_type(name, source, "kwargs", dict, "a table of keyword arguments")

    if config.has("export"):
        export = config["export"]
        if given in (["onnx"], ["optimum"]):
            raise _fail(name, "export", "(section)", "the source is already ONNX; remove [export]")
        _check_choice(name, export, "exporter", EXPORTERS)
        _check_choice(name, export, "task", TASKS)
        _check_type(name, export, "inputs", dict, "a table of input name = [shape]")
        for input_name, shape in export["inputs"].items():
            if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
                raise _fail(name, "export", f"inputs.{input_name}", f"must be a list of sizes, got {shape!r}")
        axes = export.get("dynamic_axes")
        if axes is not None and not (isinstance(axes, list) and all(isinstance(a, int) and a >= 0 for a in axes)):
            raise _fail(name, "export", "dynamic_axes", f"must be a list of axes, e.g. [0, 1], got {axes!r}")
        _check_positive(name, export, "opset", "example_seq")
        _check_type(name, export, "python", str, "the path of a Python interpreter with optimum-onnx")
        _check_choice(name, export, "precision", ("fp32", "fp16"))
        if export["task"] == "text-generation-with-past" and export["exporter"] not in ("genai", "optimum"):
            raise _fail(name, "export", "task", "a KV-cache export needs exporter = \"genai\" or \"optimum\"")
        if export["exporter"] in ("genai", "optimum") and given != ["hf"]:
            raise _fail(name, "export", "exporter", f"{export['exporter']} exports a Hugging Face folder: give [source] hf")

    data = config["data"]
    for key in ("calibration", "evaluation"):
        spec = data[key]
        if not isinstance(spec, str) or spec.split(":", 1)[0] not in DATA_KINDS:
            raise _fail(name, "data", key, f"must be one of {', '.join(DATA_KINDS)} (text, npz and photos "
                                           f"take ':PATH' or ':NAME'), got {spec!r}")
        kind, _, argument = spec.partition(":")
        if kind in ("text", "npz") and not argument:
            raise _fail(name, "data", key, f"{kind} needs a file: '{kind}:PATH'")
    _check_positive(name, data, "samples", "eval_samples", "seq")

    if config.has("prune"):
        _check_prune(config, name)
    if config.has("recover"):
        recover = config["recover"]
        _check_type(name, recover, "reconstruct", bool, "true or false")
        distill = recover.get("distill")
        if distill is not None:
            if not isinstance(distill, dict):
                raise _fail(name, "recover", "distill", f"must be a table of options (may be empty), got {distill!r}")
            for key in distill:
                if key not in DISTILL_KEYS:
                    raise _fail(name, "recover", f"distill.{key}", f"unknown (keys: {', '.join(DISTILL_KEYS)})")
        if not recover["reconstruct"] and distill is None:
            raise _fail(name, "recover", "reconstruct/distill", "give reconstruct = true and/or a distill table")
        if not config.has("prune"):
            raise _fail(name, "recover", "(section)", "recovery needs a [prune] stage")
    if config.has("fuse"):
        _check_type(name, config["fuse"], "model_type", str, "an ONNX Runtime model type (bert, gpt2, ...)")
        _check_type(name, config["fuse"], "opt_level", int, "0, 1, 2 or 99")
    if config.has("quantize"):
        quantize = config["quantize"]
        _check_choice(name, quantize, "mode", QUANT_MODES)
        _check_choice(name, quantize, "method", QUANT_METHODS)
        _check_type(name, quantize, "per_channel", bool, "true or false")
        _check_type(name, quantize, "reduce_range", bool, "true or false")
        _check_positive(name, quantize, "samples", "block_size")
        if quantize["bits"] not in (4, 8):
            raise _fail(name, "quantize", "bits", f"must be 4 or 8 (weight-only), got {quantize['bits']!r}")
    verify = config["verify"]
    _check_choice(name, verify, "metric", METRICS)
    _check_type(name, verify, "min_quality", (int, float), "a number")
    _check_type(name, verify, "max_perplexity_ratio", (int, float), "a number")
    if config.has("bench"):
        _check_positive(name, config["bench"], "batch", "runs", "repeats", "threads")
        _check_type(name, config["bench"], "warmup", int, "a whole number")
    _check_type(name, config["report"], "title", str, "text")


def _check_prune(config: BuildConfig, name: str) -> None:
    from graphprune.api import build_passes
    from graphprune.errors import OptionError
    from graphprune.pipeline import parse_pipeline

    prune = config["prune"]
    for key in ("ratio", "threshold", "sparsity", "weight_threshold", "head_ratio", "neuron_ratio", "channel_ratio",
                "target_params", "target_flops", "target_latency"):
        _check_type(name, prune, key, (int, float), "a number")
    _check_type(name, prune, "importance", str, "a criterion name")
    _check_type(name, prune, "pipeline", str, "a pass pipeline text")
    options = {k: v for k, v in prune.options.items() if k != "pipeline" and v is not None}
    reconstruct = config.has("recover") and bool(config["recover"].get("reconstruct"))
    if prune["pipeline"] is not None:
        if prune.given - {"pipeline"}:
            raise _fail(name, "prune", "pipeline", "give either pipeline or the prune options "
                                                   f"({', '.join(sorted(prune.given - {'pipeline'}))}), not both")
        try:
            parse_pipeline(prune["pipeline"])
        except GraphpruneError as exc:
            raise _fail(name, "prune", "pipeline", str(exc)) from None
        return
    try:
        build_passes(**options, reconstruct=reconstruct)
    except OptionError as exc:
        message = str(exc)
        key = next((k for k in options if f"--{k.replace('_', '-')}" in message or k in message), "options")
        raise _fail(name, "prune", key, message) from None
