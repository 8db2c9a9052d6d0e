"""The pass manager: pipeline text, options, analysis caching, verification and failure reports."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

import graphprune
from graphprune.analysis.deps import Dependencies
from graphprune.errors import PipelineError, VerificationError
from graphprune.importance import Importance
from graphprune.pipeline import (
    REGISTRY,
    AnalysisManager,
    PassManager,
    PassResult,
    RewritePass,
    parse_pipeline,
)


def test_parse_pipeline_with_options_and_aliases() -> None:
    passes = parse_pipeline("deps, importance{kind=l1,seed=3},prune{ratio=0.5,round-to=8},cleanup,verify")
    assert [p.name for p in passes] == ["analyze-deps", "score-importance", "prune-units", "cleanup-graph",
                                        "verify-model"]
    assert passes[1].options.kind == "l1" and passes[1].options.seed == 3
    assert passes[2].options.ratio == 0.5 and passes[2].options.round_to == 8
    assert passes[2].options.threshold is None
    assert repr(passes[2]) == "prune-units{ratio=0.5,round_to=8}"  # the options that differ from the defaults


@pytest.mark.parametrize("text,message", [
    ("", "the pipeline is empty"),
    ("deps,nosuch", "unknown pass 'nosuch' (known passes:"),
    ("importance{kind=l3}", "'l3' is not one of activation, fisher, flap, l1, l2"),
    ("prune{ratio}", "needs the form key=value"),
    ("prune{ratio=0.5", "unbalanced '{'"),
    ("prune{bogus=1}", "pass 'prune-units' has no option 'bogus' (options: ratio, threshold, round_to, round_mode, hidden, allocation, max_group_ratio, head_ratio, neuron_ratio, channel_ratio, target_params, target_flops, target_latency, latency_runs, uniform_heads)"),
    ("prune{round_to=2.5}", "'2.5' is not a valid int"),
    ("deps{x=1}", "has no option 'x' (options: gqa)"),
])
def test_pipeline_errors_are_clear(text: str, message: str) -> None:
    with pytest.raises(PipelineError, match=None) as info:
        parse_pipeline(text)
    assert message in str(info.value)


def test_analysis_results_are_cached_until_a_rewrite(trained_simple_net) -> None:
    model = graphprune.load_model(trained_simple_net.path)
    model.infer_shapes()
    am = AnalysisManager()
    first = am.get(Dependencies, model)
    assert am.get(Dependencies, model) is first and am.cached(Dependencies) is first
    scores = am.get(Importance, model)  # computed on request, from the cached dependencies
    am.invalidate(preserved=(Dependencies,))
    assert am.cached(Dependencies) is first and am.cached(Importance) is None
    am.invalidate()
    assert am.get(Dependencies, model) is not first and am.get(Importance, model) is not scores


def test_passes_declare_what_they_need(trained_simple_net) -> None:
    """Analyses are asked for by type; a refit pass declares that it needs the unpruned model, and
    the pass manager has the pruning pass keep it (no pass writes shared state in `check`)."""
    from graphprune.pipeline import ANALYSES, analysis_for, pass_class

    assert analysis_for(Dependencies).name == "analyze-deps" and analysis_for(Importance).name == "score-importance"
    assert Dependencies in pass_class("score-importance").requires and len(ANALYSES) == 3
    with pytest.raises(PipelineError, match="no analysis pass gives int"):
        analysis_for(int)
    model = graphprune.load_model(trained_simple_net.path)
    manager = PassManager(parse_pipeline("deps,importance,prune{ratio=0.5},reconstruct"))
    manager.run(model)
    assert manager.am.state.keep_unpruned and manager.am.state.unpruned is not None and manager.am.state.kept
    plain = PassManager(parse_pipeline("deps,importance,prune{ratio=0.5}"))
    plain.run(graphprune.load_model(trained_simple_net.path))
    assert not plain.am.state.keep_unpruned and plain.am.state.unpruned is None


def test_report_has_timing_stats_and_groups(trained_simple_net) -> None:
    model = graphprune.load_model(trained_simple_net.path)
    report = graphprune.prune(model, "unshare,deps,importance{kind=l1},prune{ratio=0.5,round_to=4},cleanup,verify")
    names = [p.name for p in report.passes]
    assert names == ["unshare-constants", "analyze-deps", "score-importance", "prune-units", "cleanup-graph",
                     "verify-model"]
    assert all(p.seconds >= 0 for p in report.passes)
    prune = report.passes[3]
    assert prune.modified and prune.stats["units_removed"] == 8  # 20 hidden -> 12 (10 rounded up to 4s)
    assert [(g["units_before"], g["units_after"]) for g in report.groups if not g["frozen"]] == [(20, 12)]
    assert report.params_after == 12 * 10 + 12 + 10 * 12 + 10
    assert report.flops_after < report.flops_before and report.verified


class _BreakOutputs(RewritePass):
    """Test pass: claims to be lossless but scales every weight."""

    name = "test-break-outputs"

    @property
    def lossless(self) -> bool:
        return True

    def run(self, model, am) -> PassResult:
        for tensor in model.weights():
            tensor.values = np.asarray(tensor.values) * 2
        return PassResult(True)


class _BreakGraph(RewritePass):
    """Test pass: disconnects a node input, which ORT/onnx.checker must refuse."""

    name = "test-break-graph"

    def run(self, model, am) -> PassResult:
        node = model.graph.nodes[-1]
        node.inputs[1] = gs.Constant("wrong_shape", np.ones((3, 3), np.float32))
        return PassResult(True)


class _ShrinkOutput(RewritePass):
    """Test pass: drops output features (a shape change the manager must refuse)."""

    name = "test-shrink-output"

    def run(self, model, am) -> PassResult:
        node = model.graph.nodes[-1]
        for index in (1, 2):
            node.inputs[index].values = np.asarray(node.inputs[index].values)[:5]
        model.graph.outputs[0].shape = ["batch", 5]  # a consistent model, only smaller
        return PassResult(True)


class _Infinite(RewritePass):
    """Test pass: divides by zero somewhere (outputs become infinite)."""

    name = "test-infinite"

    def run(self, model, am) -> PassResult:
        node = model.graph.nodes[-1]
        node.inputs[2].values = np.full_like(np.asarray(node.inputs[2].values), np.inf)
        return PassResult(True)


class _Crash(RewritePass):
    name = "test-crash"

    def run(self, model, am) -> PassResult:
        raise KeyError("boom")


@pytest.fixture()
def test_passes():
    classes = (_BreakOutputs, _BreakGraph, _ShrinkOutput, _Infinite, _Crash)
    for cls in classes:
        REGISTRY[cls.name] = cls
    yield
    for cls in classes:
        REGISTRY.pop(cls.name)


@pytest.mark.parametrize("bad,message", [
    ("test-break-outputs", "outputs changed by"),
    ("test-break-graph", "does not verify"),
    ("test-crash", "failed with KeyError"),
    ("test-shrink-output", "output shapes changed from [(2, 10)] to [(2, 5)]"),
    ("test-infinite", "NaN or infinite values"),
])
def test_failure_names_the_pass_and_those_before(trained_simple_net, test_passes, bad, message) -> None:
    model = graphprune.load_model(trained_simple_net.path)
    with pytest.raises((VerificationError, PipelineError)) as info:
        PassManager(parse_pipeline(f"unshare,deps,{bad},cleanup")).run(model)
    text = str(info.value)
    assert f"pass '{bad}'" in text and message in text
    assert "(after passes: unshare-constants, analyze-deps)" in text


def test_lossy_pass_is_not_held_to_equal_outputs(trained_simple_net) -> None:
    model = graphprune.load_model(trained_simple_net.path)
    report = graphprune.prune(model, ratio=0.5)
    assert report.verified and report.max_output_diff > 0


def test_a_rewrite_invalidates_analyses_in_the_manager(trained_simple_net, monkeypatch) -> None:
    from graphprune.passes.analyze_deps import AnalyzeDepsPass

    calls = []
    original = AnalyzeDepsPass.run
    monkeypatch.setattr(AnalyzeDepsPass, "run", lambda self, model, am: calls.append(1) or original(self, model, am))
    model = graphprune.load_model(trained_simple_net.path)
    report = PassManager(parse_pipeline("deps,prune{ratio=0.5},prune{ratio=0.5}")).run(model)
    assert len(calls) == 2  # once before the first prune, again on the pruned model
    assert [p.stats["units_removed"] for p in report.passes[1:]] == [10, 5]
    assert report.params_after == 5 * 10 + 5 + 10 * 5 + 10


def test_only_dead_unit_removal_is_declared_lossless() -> None:
    assert parse_pipeline("prune{threshold=0}")[0].lossless
    assert not parse_pipeline("prune{threshold=0.1}")[0].lossless
    assert not parse_pipeline("prune{ratio=0.1}")[0].lossless
    assert all(parse_pipeline(name)[0].lossless for name in ("unshare", "cleanup"))


class _SameComputationBreaking(_Infinite):
    """Test pass: claims to leave the computation as it was, yet makes the outputs infinite."""

    name = "test-same-but-broken"
    same_computation = True


@pytest.mark.parametrize("pipeline,names", [
    ("test-same-but-broken", "pass 'test-same-but-broken'"),  # verified at the end
    ("test-same-but-broken,prune{ratio=0.5}", "pass 'test-same-but-broken' and 'prune-units'"),
    ("test-same-but-broken,verify", "NaN or infinite"),  # verify-model's own run
])
def test_a_same_computation_rewrite_is_checked_by_the_next_verification(trained_simple_net, monkeypatch, pipeline,
                                                                          names) -> None:
    """unshare-constants only copies shared weights: the manager runs no ORT check of its own after
    it (a 135M-parameter LLM spends seconds per check) but the next one covers it, and when none
    comes a final check does; a breaking pass is still caught and named."""
    from graphprune import runtime

    REGISTRY[_SameComputationBreaking.name] = _SameComputationBreaking
    try:
        with pytest.raises(VerificationError, match="NaN or infinite") as info:
            PassManager(parse_pipeline(pipeline)).run(graphprune.load_model(trained_simple_net.path))
        assert names in str(info.value)
    finally:
        REGISTRY.pop(_SameComputationBreaking.name)
    calls = []
    original = runtime.verify
    monkeypatch.setattr(runtime, "verify", lambda *a, **k: calls.append(1) or original(*a, **k))
    from graphprune.testing import model_from_text

    model = model_from_text("""
# weights: w
<ir_version: 10, opset_import: ["" : 20]>
twice (float[N, 6] x, float[6, 6] w) => (float[N, 6] y)
{
  a = MatMul (x, w)
  r = Relu (a)
  y = MatMul (r, w)
}""")  # one weight read by both layers: unshare gives each its copy, and then a unit can go
    report = PassManager(parse_pipeline("unshare,deps,prune{ratio=0.5},verify")).run(model)
    assert report.passes[0].modified and report.passes[2].modified and report.verified
    assert len(calls) == 2  # the dense model, and after prune (covering unshare); verify-model reuses it


@pytest.mark.parametrize("options", [
    {"ratio": 0.5}, {"ratio": 0.3, "importance": "obs", "reconstruct": True},
    {"ratio": 0.2, "importance": "flap", "round_to": 8, "round_mode": "down"}, {"target_flops": 0.5, "gqa": "query"},
    {"sparsity": 0.5}, {"drop_blocks": 2, "ratio": 0.1, "neuron_ratio": 0.3, "head_ratio": 0.5, "prune_hidden": True},
    {"threshold": 1e-3, "allocation": "global", "uniform_heads": True, "seed": 7},
])
def test_pipeline_text_round_trips_through_pass_objects(options) -> None:
    """The API builds pass objects; their text (options that differ from the defaults) parses back
    into equal passes, and parsing then printing any text gives the same passes again."""
    from graphprune.api import build_passes
    from graphprune.pipeline import format_pipeline

    passes = build_passes(**options)
    assert parse_pipeline(format_pipeline(passes)) == passes
    again = parse_pipeline("deps{gqa=query}, importance{kind=l1,seed=3}, prune{ratio=0.25,round-to=8}, verify")
    assert parse_pipeline(format_pipeline(again)) == again


def test_make_pass_checks_options_like_text() -> None:
    from graphprune.pipeline import make_pass

    assert make_pass("importance", kind="obs").options.kind == "obs"
    with pytest.raises(PipelineError, match="'snip' is not one of"):
        make_pass("score-importance", kind="snip")
    with pytest.raises(PipelineError, match="has no option 'ratoi'"):
        make_pass("prune-units", ratoi=0.5)


def test_instruments_see_every_pass_and_every_change(trained_simple_net) -> None:
    from graphprune.pipeline import Instrument

    class Log(Instrument):
        def __init__(self) -> None:
            self.events: list[str] = []

        def before(self, run) -> None:
            self.events.append(f"before {run.pass_.name}")

        def changed(self, run, model, am) -> None:
            self.events.append(f"changed {run.pass_.name} verified={am.state.verification is not None}")

        def done(self, run) -> None:
            self.events.append(f"done {run.pass_.name} {run.seconds >= 0}")

    log = Log()
    model = graphprune.load_model(trained_simple_net.path)
    report = PassManager(parse_pipeline("deps,importance,prune{ratio=0.5},verify"), instruments=[log]).run(model)
    assert log.events == ["before analyze-deps", "done analyze-deps True", "before score-importance",
                          "done score-importance True", "before prune-units",
                          "changed prune-units verified=True", "done prune-units True", "before verify-model",
                          "done verify-model True"]
    assert [p.name for p in report.passes] == ["analyze-deps", "score-importance", "prune-units", "verify-model"]
