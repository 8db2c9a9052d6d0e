"""Budget allocation: uniform, global (units of a kind compete across groups), per-kind ratios."""

from __future__ import annotations

import numpy as np
import pytest

import graphprune
from graphprune.analysis.deps import analyze
from graphprune.errors import OptionError
from graphprune.importance import Importance
from graphprune.testing import model_from_text
from graphprune.transform.plan import make_plan

TWO_LAYERS = """
# weights: w1 w2 w3
<ir_version: 10, opset_import: ["" : 20]>
two (float[N, 4] x, float[4, 6] w1, float[6, 6] w2, float[6, 3] w3) => (float[N, 3] y)
{
  a = MatMul (x, w1)
  ra = Relu (a)
  b = MatMul (ra, w2)
  rb = Relu (b)
  y = MatMul (rb, w3)
}"""


def _setup():
    model = model_from_text(TWO_LAYERS)
    model.infer_shapes()
    deps = analyze(model)
    first, second = deps.prunable
    return model, deps, first, second


def test_global_allocation_ranks_normalized_scores_across_groups() -> None:
    _, deps, first, second = _setup()
    # the first group's units are all alike; the second has three nearly useless ones
    scores = Importance("test", {first.id: np.ones(6), second.id: np.array([1e-3, 2e-3, 3e-3, 1, 1, 1])})
    uniform = make_plan(deps, scores, ratio=0.25)
    assert {g: len(k) for g, k in uniform.kept.items()} == {first.id: 5, second.id: 5}
    plan = make_plan(deps, scores, ratio=0.25, allocation="global")
    assert first.id not in plan.kept  # 3 of 12 units go, all from the second group
    assert plan.kept[second.id].tolist() == [3, 4, 5]
    # at most half of a group may go: the fourth unit comes from the other group
    capped = make_plan(deps, scores, ratio=1 / 3, allocation="global", max_group_ratio=0.5)
    assert len(capped.kept[second.id]) == 3 and len(capped.kept[first.id]) == 5
    # and scale does not matter: multiplying a group's scores changes nothing
    scaled = Importance("test", {first.id: 1000 * np.ones(6), second.id: scores.scores[second.id]})
    assert make_plan(deps, scaled, ratio=0.25, allocation="global").kept.keys() == plan.kept.keys()


def test_kind_ratios_and_bad_options() -> None:
    _, deps, first, second = _setup()
    scores = Importance("test", {first.id: np.arange(6.0), second.id: np.arange(6.0)})
    plan = make_plan(deps, scores, ratio=0.5, kind_ratios={"neuron": 1 / 3})
    assert {g: len(k) for g, k in plan.kept.items()} == {first.id: 4, second.id: 4}
    with pytest.raises(OptionError, match="allocation must be one of"):
        make_plan(deps, scores, ratio=0.5, allocation="greedy")
    with pytest.raises(OptionError, match="ratio for neuron units"):
        make_plan(deps, scores, ratio=0.5, kind_ratios={"neuron": 1.5})


def test_cli_global_allocation_with_kind_ratios(tmp_path) -> None:
    from graphprune.tools.cli import main

    model = model_from_text(TWO_LAYERS)
    path = graphprune.save_model(model, tmp_path / "m.onnx")
    out = tmp_path / "p.onnx"
    assert main(["prune", str(path), "-o", str(out), "--ratio", "0.5", "--allocation", "global",
                 "--ffn-ratio", "0.25", "--importance", "taylor", "--calib", "random", "--reconstruct"]) == 0
    weights = graphprune.load_model(out).constants()
    assert weights["w1"].values.shape[1] + weights["w2"].values.shape[1] == 9  # 3 of 12 neurons went


@pytest.mark.parametrize("measure", ["params", "flops"])
def test_target_budgets_find_the_ratio(tmp_path, measure: str) -> None:
    from graphprune.tools.cli import main

    path = graphprune.save_model(model_from_text(TWO_LAYERS), tmp_path / "m.onnx")
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main(["prune", str(path), "-o", str(out), f"--target-{measure}", "0.6", "--report", str(report)]) == 0
    import json

    data = json.loads(report.read_text())
    stats = next(p["stats"] for p in data["passes"] if p["name"] == "prune-units")
    reached = data[f"{measure}_after"] / data[f"{measure}_before"]
    assert stats[f"reached_{measure}"] == pytest.approx(reached, abs=1e-3)
    # 6 -> 5 units per layer keeps 60 of 78 parameters; 4 would keep 44, below the target
    assert 0.6 <= reached <= 0.78
    assert main(["prune", str(path), "-o", str(out), "--target-params", "1.5"]) == 1


def test_target_latency_bisects_on_measured_latency(tmp_path, monkeypatch) -> None:
    """The search times every candidate against the dense model in ORT; with the timer replaced by
    a known latency model (here: proportional to the parameters) the closest candidate wins."""
    import json

    from graphprune.passes import prune_units
    from graphprune.tools.cli import main

    path = graphprune.save_model(model_from_text(TWO_LAYERS), tmp_path / "m.onnx")
    dense_params = graphprune.load_model(path).param_count()
    timed = []

    def latency_model(reference, trial, feeds, runs):
        assert feeds["x"].shape[0] == prune_units.LATENCY_SAMPLES and runs == 15
        timed.append(trial.param_count() / dense_params)
        return timed[-1]

    monkeypatch.setattr(prune_units, "latency_fraction", latency_model)
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main(["prune", str(path), "-o", str(out), "--target-latency", "0.6", "--report", str(report)]) == 0
    stats = next(p["stats"] for p in json.loads(report.read_text())["passes"] if p["name"] == "prune-units")
    assert len(timed) == 1 + prune_units.LATENCY_BISECTION_STEPS
    assert stats["target_latency"] == 0.6
    # 78 parameters dense; 5 of 6 units per layer keep 60 (0.77), 4 keep 44 (0.56): 0.56 is closer
    assert stats["reached_latency"] == pytest.approx(44 / 78, abs=1e-3)
    assert graphprune.load_model(out).param_count() == 44
    with pytest.raises(SystemExit, match="2"):
        main(["prune", str(path), "-o", str(out), "--target-latency", "0.6", "--ratio", "0.5"])


def test_target_latency_measures_for_real(tmp_path) -> None:
    """No timer replaced: the report holds a measured latency fraction (no bound on its value: this
    machine is shared; benchmarks/minilm_quality.py checks the MiniLM figure)."""
    import json

    from graphprune.tools.cli import main

    path = graphprune.save_model(model_from_text(TWO_LAYERS), tmp_path / "m.onnx")
    report = tmp_path / "r.json"
    assert main(["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--target-latency", "0.5",
                 "--report", str(report)]) == 0
    stats = next(p["stats"] for p in json.loads(report.read_text())["passes"] if p["name"] == "prune-units")
    assert stats["reached_latency"] > 0 and 0 <= stats["ratio"] <= 0.99


def test_uniform_heads_give_head_groups_of_one_size_one_count_under_global_allocation() -> None:
    import dataclasses
    import types

    _, _, first, second = _setup()
    heads = [dataclasses.replace(g, kind="head") for g in (first, second)]
    deps = types.SimpleNamespace(prunable=heads)
    scores = Importance("test", {first.id: np.ones(6), second.id: np.array([1e-3, 2e-3, 3e-3, 1, 1, 1])})
    plan = make_plan(deps, scores, ratio=0.25, allocation="global")
    assert first.id not in plan.kept and len(plan.kept[second.id]) == 3  # 6 and 3 heads kept
    even = make_plan(deps, scores, ratio=0.25, allocation="global", uniform_heads=True)
    assert {g: k.tolist() for g, k in even.kept.items()} == {first.id: [0, 1, 2, 3], second.id: [2, 3, 4, 5]}


@pytest.mark.parametrize("options", [{}, {"importance": "obs", "reconstruct": True}])
def test_a_ratio_too_small_for_a_group_leaves_it_whole_and_says_how_to_cut_it(options, caplog) -> None:
    """Two groups of 6 neurons at ratio 0.1: 0.6 of a unit, so neither loses one (a ratio never
    removes more than asked); the user is told, with the options that would cut, on both the
    prune-units and the prune-sequential path. At 0.2 one unit goes and nothing is said."""
    from graphprune.calib import random_calibration

    model = model_from_text(TWO_LAYERS)
    feeds = random_calibration(model.to_onnx(), samples=64, seed=0)
    with caplog.at_level("WARNING"):
        report = graphprune.prune(model, ratio=0.1, calibration=feeds, **options)
    assert report.params_after == report.params_before
    message = " ".join(r.getMessage() for r in caplog.records if "keep all of them" in r.getMessage())
    assert "2 neuron groups of 6 units" in message and "--neuron-ratio" in message and "--round-mode down" in message
    caplog.clear()
    with caplog.at_level("WARNING"):
        report = graphprune.prune(model_from_text(TWO_LAYERS), ratio=0.2, calibration=feeds, **options)
    assert report.params_after < report.params_before
    assert not any("keep all of them" in r.getMessage() for r in caplog.records)
