"""Pass contract, registry, text pipelines and the pass manager that verifies after every rewrite.

Pipeline text: passes separated by commas, options in braces, e.g.
``"deps,importance{kind=l2},prune{ratio=0.5,round_to=8},cleanup,verify"``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np

from graphprune import runtime
from graphprune.analysis import cost
from graphprune.analysis.deps import Dependencies
from graphprune.errors import GraphpruneError, PipelineError, VerificationError
from graphprune.importance.base import Importance
from graphprune.inputs import PassInputs
from graphprune.ir import weights
from graphprune.ir.model import Model, check_supported, first_line
from graphprune.transform.plan import group_label

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: outputs of a lossless pass may differ by this much (relative to the largest output value):
#: removing zero terms from a sum changes how fp32 kernels block and order the additions (about
#: 2e-6 on all-MiniLM-L6-v2, 1e-6 on inception_v3)
LOSSLESS_TOLERANCE = 1e-5


@dataclass(frozen=True)
class NoOptions:
    pass


@dataclass
class PassResult:
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base of all passes: a kebab-case `name`, short `aliases`, a dataclass of options, and the
    analysis results (by type) it `requires`."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = NoOptions
    #: analysis result types the pass reads (`am.get` computes them when they are not cached)
    requires: ClassVar[tuple[type, ...]] = ()

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def __repr__(self) -> str:
        """The pass as pipeline text: its name and the options that differ from their defaults
        (`parse_pipeline` reads it back into an equal pass)."""
        default = type(self.options)()
        values = ",".join(f"{f.name}={getattr(self.options, f.name)}" for f in dataclasses.fields(self.options)
                          if getattr(self.options, f.name) != getattr(default, f.name))
        return f"{self.name}{{{values}}}" if values else self.name

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.options == self.options

    def __hash__(self) -> int:
        return hash((type(self), self.options))


class AnalysisPass(Pass):
    """Reads the model, returns a frozen result the AnalysisManager caches until a rewrite; other
    passes ask for it by its type (`am.get(Dependencies, model)`)."""

    #: the type of the result, by which passes request it
    result: ClassVar[type]

    def run(self, model: Model, am: AnalysisManager) -> Any:
        raise NotImplementedError


class RewritePass(Pass):
    """Changes the model in place; `lossless` passes must leave ORT outputs unchanged."""

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        raise NotImplementedError

    @property
    def lossless(self) -> bool:
        return False

    #: analysis result types still valid after the pass modified the model (the rest are dropped)
    preserves: ClassVar[tuple[type, ...]] = ()

    #: the pass fits against the model as it was before pruning (`PipelineState.unpruned`)
    needs_unpruned: ClassVar[bool] = False

    #: the pass changes how the graph is written, not what it computes (unshare-constants copies a
    #: shared weight per reader): the pass manager checks its result with the next verification
    #: (after the next rewrite, or `verify-model`) instead of an ORT run of its own
    same_computation: bool = False

    def check(self, model: Model, am: AnalysisManager) -> None:
        """Validate options before anything runs; raise OptionError with advice."""


REGISTRY: dict[str, type[Pass]] = {}


#: analysis passes by the type of their result
ANALYSES: dict[type, type[AnalysisPass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    for key in (cls.name, *cls.aliases):
        if key in REGISTRY and REGISTRY[key] is not cls:
            raise ValueError(f"pass name '{key}' registered twice")
        REGISTRY[key] = cls
    if issubclass(cls, AnalysisPass):
        if cls.result in ANALYSES and ANALYSES[cls.result] is not cls:
            raise ValueError(f"two analyses give {cls.result.__name__}")
        ANALYSES[cls.result] = cls
    return cls


def analysis_for(result: type) -> type[AnalysisPass]:
    _load_passes()
    if result not in ANALYSES:
        raise PipelineError(f"no analysis pass gives {result.__name__}")
    return ANALYSES[result]


def pass_class(name: str) -> type[Pass]:
    _load_passes()
    if name not in REGISTRY:
        known = ", ".join(sorted({cls.name for cls in REGISTRY.values()}))
        raise PipelineError(f"unknown pass '{name}' (known passes: {known})")
    return REGISTRY[name]


def _load_passes() -> None:
    import graphprune.passes  # noqa: F401  (registers every pass)


# -- pipeline text ---------------------------------------------------------------------------------
_ITEM = re.compile(r"\s*([A-Za-z][\w-]*)\s*(?:\{([^{}]*)\})?\s*")


def _split_top(text: str) -> list[str]:
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced '}}' in pipeline '{text}'")
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise PipelineError(f"unbalanced '{{' in pipeline '{text}'")
    items.append("".join(current))
    return items


def _convert(value: str, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null", ""):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except PipelineError as exc:
                errors.append(str(exc))
        raise PipelineError(errors[0] if errors else f"{where}: bad value '{value}'")
    if origin is Literal:
        if value not in args:
            raise PipelineError(f"{where}: '{value}' is not one of {', '.join(map(str, args))}")
        return value
    try:
        if annotation is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if annotation is int:
            return int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return value
    except ValueError:
        raise PipelineError(f"{where}: '{value}' is not a valid {annotation.__name__}") from None
    raise PipelineError(f"{where}: options of type {annotation} cannot be set from text")


def make_options(cls: type[Pass], values: dict[str, str]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    hints = typing.get_type_hints(cls.Options)
    kwargs = {}
    for key, text in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            valid = ", ".join(fields) or "none"
            raise PipelineError(f"pass '{cls.name}' has no option '{key}' (options: {valid})")
        kwargs[name] = _convert(text.strip(), hints[name], f"option '{key}' of pass '{cls.name}'")
    return cls.Options(**kwargs)


def make_pass(name: str, **options: Any) -> Pass:
    """The pass `name` (or alias) with these options, checked as pipeline text would be: unknown
    options and values outside a Literal's choices raise PipelineError naming them."""
    cls = pass_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    hints = typing.get_type_hints(cls.Options)
    for key, value in options.items():
        if key not in fields:
            raise PipelineError(f"pass '{cls.name}' has no option '{key}' (options: {', '.join(fields) or 'none'})")
        choices = _choices(hints[key])
        if choices is not None and value not in choices:
            raise PipelineError(f"option '{key}' of pass '{cls.name}': '{value}' is not one of "
                                f"{', '.join(map(str, choices))}")
    return cls(cls.Options(**options))


def _choices(annotation: Any) -> tuple | None:
    """The allowed values of a Literal option (None included when it is optional), else None."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        literals = [a for a in typing.get_args(annotation) if typing.get_origin(a) is Literal]
        if literals:
            return tuple(v for a in literals for v in typing.get_args(a)) + (
                (None,) if type(None) in typing.get_args(annotation) else ())
    return None


def make_analysis(name: str, **options: Any) -> AnalysisPass:
    """`make_pass` for an analysis pass."""
    analysis = make_pass(name, **options)
    if not isinstance(analysis, AnalysisPass):
        raise PipelineError(f"'{name}' is not an analysis pass")
    return analysis


def format_pipeline(passes: list[Pass]) -> str:
    """Pipeline text that `parse_pipeline` reads back into equal passes."""
    return ",".join(repr(p) for p in passes)


def parse_pipeline(text: str) -> list[Pass]:
    """Turn pipeline text into configured passes; errors name the offending piece."""
    if not text or not text.strip():
        raise PipelineError("the pipeline is empty")
    passes = []
    for item in _split_top(text):
        match = _ITEM.fullmatch(item)
        if not match:
            raise PipelineError(f"cannot read pipeline item '{item.strip()}' (expected name or name{{k=v,...}})")
        name, body = match.group(1), match.group(2)
        cls = pass_class(name)
        values: dict[str, str] = {}
        for pair in (body or "").split(","):
            if not pair.strip():
                continue
            if "=" not in pair:
                raise PipelineError(f"option '{pair.strip()}' of pass '{cls.name}' needs the form key=value")
            key, value = pair.split("=", 1)
            values[key.strip()] = value
        passes.append(cls(make_options(cls, values)))
    return passes


# -- what passes read and hand on --------------------------------------------------------------
@dataclass
class PipelineState:
    """What the passes of one run hand on to later ones, and the pass manager's references."""

    #: a later pass fits against the model as it was before pruning (see `RewritePass.needs_unpruned`)
    keep_unpruned: bool = False
    #: that model, copied by the pruning pass
    unpruned: Model | None = None
    #: (tensor, axis) -> element indices the pruning kept, for refit targets
    kept: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    #: state inputs and outputs (a KV cache) that lost units so far: name -> axis -> kept indices
    resized: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    #: the pass manager's sample feeds, the dense model's outputs on them and their shapes
    feeds: dict[str, np.ndarray] | None = None
    dense_outputs: list[np.ndarray] | None = None
    output_shapes: tuple | None = None
    #: the verification of the model as it is now (None after a rewrite not yet verified)
    verification: runtime.Verification | None = None


class AnalysisManager:
    """Caches analysis results by their type; a modifying rewrite drops those it does not preserve."""

    def __init__(self, inputs: PassInputs | None = None) -> None:
        self._results: dict[type, Any] = {}
        self._configured: dict[type, AnalysisPass] = {}
        self.model: Model | None = None
        self.inputs = inputs or PassInputs()
        self.state = PipelineState()

    def run(self, analysis: AnalysisPass, model: Model) -> Any:
        self._configured[analysis.result] = analysis
        self._results[analysis.result] = analysis.run(model, self)
        return self._results[analysis.result]

    def get(self, result: type[T], model: Model) -> T:
        """The cached analysis result of type `result`, re-run (with its last options) when stale."""
        if result not in self._results:
            analysis = self._configured.get(result) or analysis_for(result)()
            return self.run(analysis, model)
        return self._results[result]

    def cached(self, result: type[T]) -> T | None:
        """The current result of type `result`, or None when it has not run since the last rewrite."""
        return self._results.get(result)

    def invalidate(self, preserved: tuple[type, ...] = ()) -> None:
        self._results = {kind: value for kind, value in self._results.items() if kind in preserved}


# -- pass manager ----------------------------------------------------------------------------------
@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool
    stats: dict[str, Any]


@dataclass
class Report:
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    groups: list[dict[str, Any]] = field(default_factory=list)
    passes: list[PassRecord] = field(default_factory=list)
    verified: bool = False
    max_output_diff: float | None = None
    #: state inputs and outputs (a KV cache) that lost units: name -> axis -> kept indices
    state: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    #: a causal LM's perplexity before and after on held-out windows (`prune --eval-data`)
    perplexity: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["passes"] = [dataclasses.asdict(p) for p in self.passes]
        return _jsonable(data)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


Progress = Callable[[str, int, int], None]


@dataclass
class PassRun:
    """One pass's run as the instruments see it."""

    index: int
    total: int
    pass_: Pass
    #: the names of the passes that ran before it
    before: list[str]
    outcome: PassResult = field(default_factory=lambda: PassResult(False))
    seconds: float = 0.0
    #: state inputs and outputs (a KV cache) this pass took units from: name -> axis -> kept
    resized: dict[str, dict[int, list[int]]] | None = None


class Instrument:
    """Hooks around the passes of `PassManager.run` (TVM's PassInstrument): `start` before the
    first pass, `before` and `after` every pass (`after` while its analyses are still cached),
    `changed` after a rewrite that modified the model (its stale analyses dropped), `done` when a
    pass is finished, `finish` after the last one."""

    def start(self, model: Model, am: AnalysisManager) -> None:
        pass

    def before(self, run: PassRun) -> None:
        pass

    def after(self, run: PassRun, model: Model, am: AnalysisManager) -> None:
        pass

    def changed(self, run: PassRun, model: Model, am: AnalysisManager) -> None:
        pass

    def done(self, run: PassRun) -> None:
        pass

    def finish(self, model: Model, am: AnalysisManager) -> None:
        pass


class Timing(Instrument):
    def before(self, run: PassRun) -> None:
        self._start = time.perf_counter()

    def after(self, run: PassRun, model: Model, am: AnalysisManager) -> None:
        run.seconds = time.perf_counter() - self._start


class ProgressReport(Instrument):
    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def before(self, run: PassRun) -> None:
        self.progress(run.pass_.name, run.index, run.total)


class ReleaseWeights(Instrument):
    """What a pass read of memory-mapped weights leaves memory again."""

    def after(self, run: PassRun, model: Model, am: AnalysisManager) -> None:
        weights.release_all()


class Reporting(Instrument):
    """The report: costs before and after, the groups (with every unit's score, for the charts)
    and their unit counts, the resized state, one record per pass."""

    def __init__(self, report: Report) -> None:
        self.report = report

    def start(self, model: Model, am: AnalysisManager) -> None:
        before = cost.totals(model)
        self.report.params_before, self.report.macs_before, self.report.flops_before = \
            before.params, before.macs, before.flops

    def after(self, run: PassRun, model: Model, am: AnalysisManager) -> None:
        report = self.report
        deps = am.cached(Dependencies)  # run by this pass or asked for by it
        if deps is not None and not report.groups:
            report.groups = [{"id": g.id, "kind": g.kind, "label": group_label(g), "units_before": g.units,
                              "units_after": g.units, "frozen": bool(g.frozen)} for g in deps.weight_groups]
        importance = am.cached(Importance)
        if importance is not None and report.groups and "scores" not in report.groups[0]:
            for entry in report.groups:
                values = importance.scores.get(entry["id"])
                entry["scores"] = None if values is None else [float(v) for v in values]
        run.resized = run.outcome.stats.pop("state", None)
        for name, axes in (run.resized or {}).items():  # a later rewrite takes from what is left
            earlier = report.state.setdefault(name, {})
            for axis, indices in axes.items():
                earlier[axis] = [earlier[axis][i] for i in indices] if axis in earlier else indices
        if run.resized:
            am.state.resized = report.state
        _update_groups(report, run.outcome.stats.pop("group_units", None))

    def done(self, run: PassRun) -> None:
        self.report.passes.append(PassRecord(run.pass_.name, round(run.seconds, 4), run.outcome.modified,
                                             run.outcome.stats))

    def finish(self, model: Model, am: AnalysisManager) -> None:
        after = cost.totals(model)
        self.report.params_after, self.report.macs_after, self.report.flops_after = \
            after.params, after.macs, after.flops


class Verifier(Instrument):
    """The dense model's outputs on seeded sample inputs, and after every rewrite that modified the
    model: checker, shape inference, an ORT run, the same output shapes, and for lossless passes
    the same outputs. A same-computation rewrite is covered by the next verification (or a final
    one). A failure names the pass and the passes before it."""

    def __init__(self, report: Report, seed: int) -> None:
        self.report = report
        self.seed = seed
        self.unchecked: list[str] = []

    def start(self, model: Model, am: AnalysisManager) -> None:
        proto = model.to_onnx()
        self.feeds = runtime.sample_inputs(proto, seed=self.seed)
        try:
            check, self.dense = runtime.verify(proto, self.feeds)
        except VerificationError as exc:
            raise VerificationError(f"the input model does not verify before any pass: {exc}") from exc
        self.shapes, self.reference = check.output_shapes, self.dense
        self._share(am)

    def _share(self, am: AnalysisManager) -> None:
        am.state.feeds, am.state.dense_outputs, am.state.output_shapes = self.feeds, self.dense, self.shapes

    def after(self, run: PassRun, model: Model, am: AnalysisManager) -> None:
        if run.resized:  # a KV cache lost heads: so do the sample feeds and the references
            self.feeds, self.shapes, self.reference, self.dense = _resize_references(
                model, run.resized, self.feeds, self.shapes, self.reference, self.dense)
            self._share(am)

    def changed(self, run: PassRun, model: Model, am: AnalysisManager) -> None:
        if not isinstance(run.pass_, RewritePass):
            return
        if run.pass_.same_computation:
            self.unchecked.append(run.pass_.name)
            return
        tolerance = LOSSLESS_TOLERANCE if run.pass_.lossless else None
        names = " and ".join(f"'{name}'" for name in [*self.unchecked, run.pass_.name])
        self.unchecked = []
        try:
            check, self.reference = runtime.verify(model.to_onnx(), self.feeds, self.shapes, self.reference, tolerance)
        except VerificationError as exc:
            raise VerificationError(f"pass {names} produced a model that does not verify: "
                                    f"{exc}{_after(run.before)}") from exc
        if check.max_abs_diff is not None:
            run.outcome.stats.setdefault("output_change", check.max_abs_diff)
        am.state.verification = check  # verify-model needs no second run

    def finish(self, model: Model, am: AnalysisManager) -> None:
        if self.unchecked and am.state.verification is None:
            try:  # no rewrite or verify-model came after them
                _, self.reference = runtime.verify(model.to_onnx(), self.feeds, self.shapes, self.reference,
                                                   LOSSLESS_TOLERANCE)
            except VerificationError as exc:
                names = " and ".join(f"'{name}'" for name in self.unchecked)
                raise VerificationError(f"pass {names} produced a model that does not verify: {exc}") from exc
        self.report.verified = True
        self.report.max_output_diff = runtime.max_relative_diff(self.dense, self.reference)


class PassManager:
    """Runs passes in order, with instruments around them (timing, progress, weight release, the
    report and, unless `verify=False`, verification after every rewrite that modified the model)."""

    def __init__(self, passes: list[Pass], verify: bool = True, seed: int = 0,
                 progress: Progress | None = None, inputs: PassInputs | None = None,
                 instruments: list[Instrument] | None = None) -> None:
        self.passes = passes
        self.verify = verify
        self.seed = seed
        self.progress = progress
        self.am = AnalysisManager(inputs)
        self.extra = instruments or []

    def run(self, model: Model) -> Report:
        check_supported(model)
        self.am.state.keep_unpruned = any(isinstance(p, RewritePass) and p.needs_unpruned for p in self.passes)
        for p in self.passes:
            if isinstance(p, RewritePass):
                p.check(model, self.am)
        model.infer_shapes()
        report = Report()
        instruments: list[Instrument] = [ProgressReport(self.progress)] if self.progress else []
        instruments += [Timing(), ReleaseWeights(), Reporting(report)]
        instruments += [Verifier(report, self.seed)] if self.verify else []
        instruments += self.extra
        for instrument in instruments:
            instrument.start(model, self.am)
        done: list[str] = []
        for index, p in enumerate(self.passes):
            run = PassRun(index, len(self.passes), p, list(done))
            for instrument in instruments:
                instrument.before(run)
            run.outcome = self._run_pass(p, model, done)
            for instrument in instruments:
                instrument.after(run, model, self.am)
            if isinstance(p, RewritePass) and run.outcome.modified:
                self.am.invalidate(p.preserves)
                self.am.state.verification = None
                for instrument in instruments:
                    instrument.changed(run, model, self.am)
            for instrument in instruments:
                instrument.done(run)
            done.append(p.name)
        for instrument in instruments:
            instrument.finish(model, self.am)
        return report

    def _run_pass(self, p: Pass, model: Model, done: list[str]) -> PassResult:
        try:
            if isinstance(p, AnalysisPass):
                result = self.am.run(p, model)
                return PassResult(False, getattr(result, "stats", {}) or {})
            if not isinstance(p, RewritePass):
                raise PipelineError(f"'{p.name}' is neither an analysis nor a rewrite pass")
            return p.run(model, self.am)
        except GraphpruneError as exc:
            raise type(exc)(f"pass '{p.name}' failed: {exc}{_after(done)}") from exc
        except ModuleNotFoundError:
            raise  # an optional dependency the pass needs: the CLI names the extra that installs it
        except Exception as exc:
            logger.debug("pass %s raised", p.name, exc_info=True)
            raise PipelineError(f"pass '{p.name}' failed with {type(exc).__name__}: "
                                f"{first_line(exc)}{_after(done)}") from exc


def _take_axes(array: np.ndarray, axes: dict[int, list[int]]) -> np.ndarray:
    for axis, indices in axes.items():
        array = np.take(array, indices, axis=int(axis))
    return array


def take_state(arrays: dict[str, np.ndarray], state: dict[str, dict[int, list[int]]]) -> dict[str, np.ndarray]:
    """Inputs for the pruned model from inputs for the dense one: the units the rewrite removed
    from state inputs (a KV cache's heads) taken out (`Report.state`, `PipelineState.resized`)."""
    return {name: _take_axes(value, state[name]) if name in state else value for name, value in arrays.items()}


def _resize_references(model: Model, resized: dict[str, dict[int, list[int]]], feeds: dict, shapes: tuple,
                       reference: list, dense: list) -> tuple[dict, tuple, list, list]:
    """Feeds, expected output shapes and reference outputs with the units a rewrite removed from
    state inputs and outputs (a KV cache) taken out the same way."""
    take = _take_axes
    feeds = take_state(feeds, resized)
    names = [t.name for t in model.graph.outputs]
    reference = [take(r, resized[n]) if n in resized else r for n, r in zip(names, reference, strict=True)]
    dense = [take(r, resized[n]) if n in resized else r for n, r in zip(names, dense, strict=True)]
    shapes = tuple(tuple(r.shape) if n in resized else s for n, r, s in zip(names, reference, shapes, strict=True))
    return feeds, shapes, reference, dense


def _update_groups(report: Report, group_units: dict[int, int] | None) -> None:
    """Record new unit counts; group ids are stable across passes because groups are ordered by
    the first appearance of their tensors, which pruning does not change."""
    if not group_units:
        return
    for entry in report.groups:
        if entry["id"] in group_units:
            entry["units_after"] = group_units[entry["id"]]


def _after(done: list[str]) -> str:
    return f" (after passes: {', '.join(done)})" if done else " (it was the first pass)"
