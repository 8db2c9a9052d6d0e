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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np

from graphprune import cost, runtime, weights
from graphprune.deps import Dependencies
from graphprune.errors import GraphpruneError, PipelineError, VerificationError
from graphprune.importance.base import Importance
from graphprune.ir import Model, check_supported, first_line
from graphprune.plan import group_label

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
        values = ",".join(f"{f.name}={getattr(self.options, f.name)}" for f in dataclasses.fields(self.options))
        return f"{self.name}{{{values}}}" if values else self.name


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
    items, depth, current = [], 0, []
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
@dataclass(frozen=True)
class PassInputs:
    """What the caller gives the passes: calibration feeds, labels (one per calibration sample),
    per-weight saliency arrays by initializer name, and the seed of anything random."""

    calibration: Mapping[str, np.ndarray] | None = None
    labels: np.ndarray | None = None
    saliency: Mapping[str, np.ndarray] | None = None
    seed: int = 0


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


class PassManager:
    """Runs passes in order, verifying the model after every rewrite that modified it."""

    def __init__(self, passes: list[Pass], verify: bool = True, seed: int = 0,
                 progress: Progress | None = None, inputs: PassInputs | None = None) -> None:
        self.passes = passes
        self.verify = verify
        self.seed = seed
        self.progress = progress
        self.am = AnalysisManager(inputs)

    def run(self, model: Model) -> Report:
        check_supported(model)
        state = self.am.state
        state.keep_unpruned = any(isinstance(p, RewritePass) and p.needs_unpruned for p in self.passes)
        for p in self.passes:
            if isinstance(p, RewritePass):
                p.check(model, self.am)
        model.infer_shapes()
        report = Report()
        before = cost.totals(model)
        report.params_before, report.macs_before, report.flops_before = before.params, before.macs, before.flops
        feeds = reference = dense = shapes = None
        if self.verify:
            proto = model.to_onnx()
            feeds = runtime.sample_inputs(proto, seed=self.seed)
            try:
                check, dense = runtime.verify(proto, feeds)
            except VerificationError as exc:
                raise VerificationError(f"the input model does not verify before any pass: {exc}") from exc
            shapes, reference = check.output_shapes, dense
            state.feeds, state.dense_outputs, state.output_shapes = feeds, dense, shapes
        done: list[str] = []
        unchecked: list[str] = []  # same-computation rewrites since the last verification
        for index, p in enumerate(self.passes):
            if self.progress:
                self.progress(p.name, index, len(self.passes))
            start = time.perf_counter()
            try:
                if isinstance(p, AnalysisPass):
                    result = self.am.run(p, model)
                    outcome = PassResult(False, getattr(result, "stats", {}) or {})
                else:
                    outcome = p.run(model, self.am)
            except GraphpruneError as exc:
                raise type(exc)(f"pass '{p.name}' failed: {exc}{_after(done)}") from exc
            except Exception as exc:
                logger.debug("pass %s raised", p.name, exc_info=True)
                raise PipelineError(f"pass '{p.name}' failed with {type(exc).__name__}: "
                                    f"{first_line(exc)}{_after(done)}") from exc
            seconds = time.perf_counter() - start
            weights.release_all()  # what the pass read of memory-mapped weights leaves memory again
            deps = self.am.cached(Dependencies)  # run by this pass or asked for by it
            if deps is not None and not report.groups:
                report.groups = [{"id": g.id, "kind": g.kind, "label": group_label(g), "units_before": g.units,
                                  "units_after": g.units, "frozen": bool(g.frozen)} for g in deps.weight_groups]
            importance = self.am.cached(Importance)
            if importance is not None and report.groups and "scores" not in report.groups[0]:
                for entry in report.groups:  # for the report's charts: every unit's score, as scored
                    values = importance.scores.get(entry["id"])
                    entry["scores"] = None if values is None else [float(v) for v in values]
            resized = outcome.stats.pop("state", None)
            for name, axes in (resized or {}).items():  # a later rewrite takes from what is left
                earlier = report.state.setdefault(name, {})
                for axis, indices in axes.items():
                    earlier[axis] = [earlier[axis][i] for i in indices] if axis in earlier else indices
            if resized:
                state.resized = report.state
            if resized and self.verify:  # a KV cache lost heads: so do its sample feeds and references
                feeds, shapes, reference, dense = _resize_references(model, resized, feeds, shapes, reference, dense)
                state.feeds, state.dense_outputs, state.output_shapes = feeds, dense, shapes
            if isinstance(p, RewritePass) and outcome.modified:
                self.am.invalidate(p.preserves)
                state.verification = None
                if p.same_computation:
                    unchecked.append(p.name)
                elif self.verify:
                    tolerance = LOSSLESS_TOLERANCE if p.lossless else None
                    names = " and ".join(f"'{name}'" for name in [*unchecked, p.name])
                    unchecked = []
                    try:
                        check, reference = runtime.verify(model.to_onnx(), feeds, shapes, reference, tolerance)
                    except VerificationError as exc:
                        raise VerificationError(f"pass {names} produced a model that does not verify: "
                                                f"{exc}{_after(done)}") from exc
                    if check.max_abs_diff is not None:
                        outcome.stats.setdefault("output_change", check.max_abs_diff)
                    state.verification = check  # verify-model needs no second run
            _update_groups(report, outcome.stats.pop("group_units", None))
            report.passes.append(PassRecord(p.name, round(seconds, 4), outcome.modified, outcome.stats))
            done.append(p.name)
        if unchecked and self.verify and state.verification is None:
            try:  # no rewrite or verify-model came after them
                check, reference = runtime.verify(model.to_onnx(), feeds, shapes, reference, LOSSLESS_TOLERANCE)
            except VerificationError as exc:
                names = " and ".join(f"'{name}'" for name in unchecked)
                raise VerificationError(f"pass {names} produced a model that does not verify: {exc}") from exc
        after = cost.totals(model)
        report.params_after, report.macs_after, report.flops_after = after.params, after.macs, after.flops
        if self.verify:
            report.verified = True
            report.max_output_diff = runtime.max_relative_diff(dense, reference)
        return report


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
