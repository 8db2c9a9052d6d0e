"""Run a build: plan the stages, reuse every stage whose content hash is already in the cache, run
the others, then write the output folder and the report.

Each stage's key hashes its options, its parent's key and the data it reads (a source's key hashes
the source's files), so changing one stage reruns it and the stages after it, never those before.
A stage writes into a temporary folder renamed into the cache only when it succeeded: a failed
stage names itself and leaves every earlier result in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

import graphprune
from graphprune.build import stages
from graphprune.build.config import BuildConfig
from graphprune.build.data import fingerprint
from graphprune.errors import GraphpruneError
from graphprune.ir.model import first_line, model_bytes, model_files, save_model
from graphprune.tools import progress

logger = logging.getLogger(__name__)

#: row labels of the model stages in the report
LABELS = {"export": "dense", "prune": "pruned", "recover": "distilled", "fuse": "fused", "quantize": "int8"}


class BuildError(GraphpruneError):
    """A stage failed; the message names it (earlier stages' outputs stay in the cache)."""


@dataclass
class Step:
    """One planned stage: its name, the step it reads, its key, and (after running) what it did."""

    name: str  # "export", "prune", ..., "verify", "bench"
    label: str  # the report's row label for a model stage ("pruned + reconstruct", "dense int8")
    key: str
    parent: Step | None = None
    reference: bool = False  # a stage applied to the dense model for comparison (dense fused / int8)
    cached: bool = False
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None

    @property
    def model(self) -> Path:
        assert self.folder is not None
        return self.folder / stages.MODEL

    @property
    def title(self) -> str:
        return self.name + (" (dense)" if self.reference else "")

    @property
    def makes_model(self) -> bool:
        return self.name in LABELS


@dataclass
class BuildResult:
    config: BuildConfig
    steps: list[Step]
    output: Path
    report: dict[str, Any]

    def step(self, name: str, reference: bool = False) -> Step:
        return next(s for s in self.steps if s.name == name and s.reference == reference)

    @property
    def ran(self) -> list[str]:
        return [s.title for s in self.steps if not s.cached]

    @property
    def reused(self) -> list[str]:
        return [s.title for s in self.steps if s.cached]


def _hash(*parts: Any) -> str:
    text = json.dumps([graphprune.__version__, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_key(ctx: stages.Context) -> str:
    """The source's content: its ONNX files, the Hugging Face folder's files, or the factory's code."""
    source = ctx.config["source"]
    if source.get("onnx") is not None:
        path = Path(ctx.value_of(source["onnx"]))
        if not path.is_file():
            raise BuildError(f"[source] onnx: {path} does not exist")
        return _hash("onnx", sorted(_file_hash(p) for p in model_files(path) if p.is_file()))
    if source.get("hf") is not None or source.get("optimum") is not None:
        folder = ctx.hf_folder
        kind = "hf" if source.get("hf") is not None else "optimum"
        if folder is None or not (folder / "config.json").is_file():
            raise BuildError(f"[source] {kind}: {folder} is not a Hugging Face or Optimum folder (no config.json)")
        if kind == "optimum":
            ctx.source_model()  # names a folder without its model
        files = sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts)
        return _hash("hf", [(str(p.relative_to(folder)), _file_hash(p)) for p in files])
    import importlib.util

    module = str(source["factory"]).partition(":")[0]
    spec = importlib.util.find_spec(module)
    code = _file_hash(Path(spec.origin)) if spec is not None and spec.origin and Path(spec.origin).is_file() else ""
    return _hash("factory", source["factory"], source["kwargs"], code)


def plan(config: BuildConfig) -> tuple[stages.Context, list[Step]]:
    """The steps this config runs, in order, with their keys (nothing runs)."""
    ctx = stages.Context(config)
    data = config["data"]
    calibration = (fingerprint(data["calibration"], config.folder), data["samples"], data["seq"])
    seed = config["build"]["seed"]
    steps: list[Step] = []
    root = source_key(ctx)
    parent: Step | None = None
    if ctx.source_model() is None:
        parent = Step("export", "dense", _hash("export", root, _options(config, "export")))
        steps.append(parent)
    dense = parent
    for name in ("prune", "recover", "fuse", "quantize"):
        if not config.has(name) or (name == "recover" and config["recover"]["distill"] is None):
            continue
        options = _options(config, name)
        if name == "prune":
            options = options | {"reconstruct": config.has("recover") and config["recover"]["reconstruct"]}
        uses_data = name in ("prune", "recover") or (name == "quantize" and options["mode"] == "static")
        key = _hash(name, parent.key if parent else root, options, calibration if uses_data else None, seed)
        label = _label(config, name, parent)
        parent = Step(name, label, key, parent)
        steps.append(parent)
    if config.has("prune"):  # the dense model through the same fuse / quantize, for a like-for-like bench
        reference = dense
        for name in ("fuse", "quantize"):
            if config.has(name):
                options = _options(config, name)
                uses_data = name == "quantize" and options["mode"] == "static"
                key = _hash(name, reference.key if reference else root, options,
                            calibration if uses_data else None, seed)
                label = "dense " + _suffix(config, name) if reference is None or reference is dense else \
                    reference.label + " " + _suffix(config, name)
                reference = Step(name, label, key, reference, reference=True)
                steps.append(reference)
    models = [s.key for s in steps]
    evaluation = (fingerprint(data["evaluation"], config.folder), data["eval_samples"], data["seq"])
    steps.append(Step("verify", "verify", _hash("verify", root, models, evaluation, _options(config, "verify"),
                                                config["build"]["provider"])))
    if config.has("bench"):
        steps.append(Step("bench", "bench", _hash("bench", root, models, evaluation, _options(config, "bench"),
                                                  config["build"]["provider"], config["build"]["threads"])))
    return ctx, steps


def _options(config: BuildConfig, name: str) -> dict[str, Any]:
    return dict(config[name].options) if config.has(name) else {}


def _label(config: BuildConfig, name: str, parent: Step | None) -> str:
    if name in ("fuse", "quantize"):
        return f"{parent.label if parent else 'dense'} {_suffix(config, name)}"
    return LABELS[name]


def _suffix(config: BuildConfig, name: str) -> str:
    """What a fuse or quantize stage adds to a row's label: fused, int8, or int4 (4-bit weights)."""
    if name == "quantize" and config["quantize"]["mode"] == "weight-only" and config["quantize"]["bits"] == 4:
        return "int4"
    return LABELS[name]


def describe(config: BuildConfig, steps: list[Step]) -> list[dict[str, Any]]:
    """The plan as rows (for --dry-run): stage, what it reads, key, cached or to run."""
    cache = config.cache
    rows = []
    models_run = False
    for step in steps:
        done = (cache / f"{step.name}-{step.key}" / "stage.json").is_file()
        if step.makes_model:
            models_run |= not done
        else:
            done &= not models_run
        stage = "prune + reconstruct" if step.name == "prune" and config.has("recover") and \
            config["recover"]["reconstruct"] else step.name
        rows.append({"stage": stage + (" (dense)" if step.reference else ""), "row": step.label,
                     "reads": step.parent.label if step.parent else "source" if step.makes_model else "every model", "key": step.key,
                     "status": "cached" if done else "runs"})
    return rows


def run_build(config: BuildConfig, console: Console | None = None, rerun: frozenset[str] = frozenset(),
              on_step: Callable[[Step], None] | None = None, only: frozenset[str] | None = None) -> BuildResult:
    """Run (or reuse) every step, then write the output folder: the final model, its config and
    tokenizer, report.json and report.html. `rerun` names stages to run even when cached. `only`
    (step keys): run just those model steps, into the cache, and write no output folder (a sweep
    runs the steps its variants share this way first)."""
    from graphprune.build import report

    console = console or Console(stderr=True)
    ctx, steps = plan(config)
    if only is not None:
        steps = [s for s in steps if s.makes_model and s.key in only]
    output = config.output
    cache = config.cache
    cache.mkdir(parents=True, exist_ok=True)
    ctx.dense = ctx.source_model()
    for step in steps:
        step.folder = cache / f"{step.name}-{step.key}"
        record = step.folder / "stage.json"
        upstream_ran = not step.makes_model and any(s.makes_model and not s.cached for s in steps)
        if record.is_file() and step.name not in rerun and not upstream_ran:
            saved = json.loads(record.read_text())
            step.cached, step.seconds, step.stats = True, saved["seconds"], saved["stats"]
            logger.info("stage %s: cached (%s)", step.name, step.key)
        else:
            _run_step(ctx, steps, step, cache, console)
        if step.name == "export":
            ctx.dense = step.model
        if on_step:
            on_step(step)
    if only is not None:
        return BuildResult(config, steps, output, {})
    model_steps = [s for s in steps if s.makes_model]
    final = next((s for s in reversed(model_steps) if not s.reference), None)
    final_model = final.model if final else ctx.dense
    assert final_model is not None
    with progress.status(console, f"writing {output}"):
        written = _write_output(ctx, output, final_model, next((s for s in steps if s.name == "prune"), None))
        built = report.build_report(config, ctx, steps, written)
        pruned = next((s for s in steps if s.name == "prune"), None)
        report.write_report(built, output, None if pruned is None else pruned.model.parent / "prune-report.json")
    return BuildResult(config, steps, output, built)


def _run_step(ctx: stages.Context, steps: list[Step], step: Step, cache: Path, console: Console) -> None:
    from graphprune.build import evaluate

    assert step.folder is not None
    scratch = Path(tempfile.mkdtemp(prefix=f".tmp-{step.name}-{step.key}-", dir=cache))
    what = step.label if step.makes_model else step.name
    start = time.perf_counter()
    try:
        with progress.status(console, f"stage {step.name}: {what}") as status:
            ctx.show = lambda text: status.update(f"stage {step.name}: {what}: {text}")
            if step.makes_model:
                parent = step.parent.model if step.parent else ctx.dense
                ctx.prune_report = _prune_report(step)
                step.stats = stages.MODEL_STAGE_FUNCTIONS[step.name](ctx, parent, scratch)
            elif step.name == "verify":
                step.stats = evaluate.verify_all(ctx, [s for s in steps if s.makes_model])
            else:
                step.stats = evaluate.bench_all(ctx, [s for s in steps if s.makes_model])
    except KeyboardInterrupt:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        if isinstance(exc, GraphpruneError):
            raise BuildError(f"stage {step.name} failed: {exc}") from exc
        raise BuildError(f"stage {step.name} failed: {type(exc).__name__}: {first_line(exc)}") from exc
    step.seconds = time.perf_counter() - start
    (scratch / "stage.json").write_text(json.dumps({"stage": step.name, "key": step.key, "seconds": step.seconds,
                                                    "stats": step.stats}, indent=1, default=str))
    _publish(scratch, step.folder)
    console.print(f"stage {step.name}{' (dense)' if step.reference else ''}: {what} done in {step.seconds:.1f} s",
                  highlight=False)


def _publish(scratch: Path, folder: Path) -> None:
    """Move a finished stage into the cache. Where the folder is there already (a --rerun, or a
    parallel task that made the same stage: same key, same content), the older one is replaced;
    a rename cannot clobber a non-empty folder, so the old one is moved aside first."""
    if folder.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".old-{folder.name}-", dir=folder.parent))
        try:
            folder.rename(aside / "stage")
        except FileNotFoundError:  # a parallel task moved it already
            pass
        shutil.rmtree(aside, ignore_errors=True)
    try:
        scratch.rename(folder)
    except OSError:  # a parallel task published the same key meanwhile: keep theirs
        shutil.rmtree(scratch, ignore_errors=True)


def _prune_report(step: Step) -> Path | None:
    """The prune stage's report, when `step` reads a pruned model (its counts of heads and neurons)."""
    ancestor = step.parent
    while ancestor is not None and ancestor.name != "prune":
        ancestor = ancestor.parent
    return None if ancestor is None or ancestor.folder is None else ancestor.folder / "prune-report.json"


def _write_output(ctx: stages.Context, output: Path, final_model: Path, pruned: Step | None) -> dict[str, Any]:
    """The deployable folder: model.onnx (external data when large), config.json with the pruned
    sizes, the tokenizer files."""
    from graphprune.ir.model import load_model
    from graphprune.tools.configs import ConfigError, write_config

    config = ctx.config
    large = model_bytes(final_model) > config["build"]["external_data_mb"] << 20
    for stale in (output / stages.MODEL, output / (stages.MODEL + ".data")):
        stale.unlink(missing_ok=True)
    save_model(load_model(final_model), output / stages.MODEL, external=True if large else None)
    written: dict[str, Any] = {"model": stages.MODEL, "external_data": large}
    report = None if pruned is None or pruned.folder is None else \
        json.loads((pruned.folder / "prune-report.json").read_text())
    configs = [] if ctx.hf_folder is None else [ctx.hf_folder / "config.json"]
    if ctx.dense is not None:  # onnxruntime-genai's builder writes its own config beside the model
        configs.append(ctx.dense.parent / "genai_config.json")
    for source in (path for path in configs if path.is_file()):
        try:
            target = write_config(source, output, report) if report is not None else \
                Path(shutil.copy2(source, output / source.name))
        except ConfigError as exc:
            logger.warning("%s not written: %s", source.name, exc)
            written[source.name] = f"not written: {exc}"
            continue
        _portable_config(target)
        written[source.name] = "pruned sizes" if report is not None else "as the source"
    written["tokenizer"] = stages.copy_tokenizer(None if ctx.tokenizer is None else Path(ctx.tokenizer), output)
    stages.portable_tokenizer(output, causal=ctx.causal(final_model))
    return written


def _portable_config(path: Path) -> None:
    """Spell out what older readers (Optimum's transformers 4.x) would otherwise get wrong:
    `rope_theta` (transformers 5 keeps it only in rope_parameters; 4.x then silently uses 10000)."""
    config = json.loads(path.read_text())
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
        path.write_text(json.dumps(config, indent=2) + "\n")
