"""Golden dependency cases: tests/golden/<case>.onnx.txt (ONNX text) beside <case>.expected.

Each case is analysed (as `graphprune inspect` sees it) and its groups rendered as text must equal
the expected file. Then the case is pruned at ratio 0.5 through the verifying pass manager: the
result must pass onnx.checker and ORT with unchanged output shapes, and lose parameters exactly
when some group is prunable. Set GRAPHPRUNE_UPDATE_GOLDEN=1 to write a missing expected file
(then read it: the expected text is the test's claim).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import graphprune
from graphprune import runtime
from graphprune.deps import analyze, render
from graphprune.ir import unshare_constants
from graphprune.testing import model_from_text

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(GOLDEN.glob("*.onnx.txt"))


@pytest.mark.parametrize("case", CASES, ids=[c.name.removesuffix(".onnx.txt") for c in CASES])
def test_golden_groups(case: Path) -> None:
    model = model_from_text(case.read_text())
    rendered = render(graphprune.inspect(model))
    expected_path = case.with_name(case.name.removesuffix(".onnx.txt") + ".expected")
    if not expected_path.exists():
        if os.environ.get("GRAPHPRUNE_UPDATE_GOLDEN"):
            expected_path.write_text(rendered)
        pytest.fail(f"no expected file for {case.name}; rendered groups:\n{rendered}")
    assert rendered == expected_path.read_text()


@pytest.mark.parametrize("case", CASES, ids=[c.name.removesuffix(".onnx.txt") for c in CASES])
def test_golden_prunes_and_verifies(case: Path) -> None:
    model = model_from_text(case.read_text())
    prunable = graphprune.inspect(model).prunable
    before = model.param_count()
    report = graphprune.prune(model, ratio=0.5)
    assert report.verified
    if prunable:
        assert report.params_after < before
        assert any(g["units_after"] < g["units_before"] for g in report.groups)
    else:
        assert report.params_after == before


def test_every_case_has_expected_file() -> None:
    missing = [c.name for c in CASES if not c.with_name(c.name.removesuffix(".onnx.txt") + ".expected").exists()]
    assert not missing


@pytest.mark.parametrize("case", CASES, ids=[c.name.removesuffix(".onnx.txt") for c in CASES])
def test_golden_dead_units_are_removed_exactly(case: Path) -> None:
    """Zero every odd unit of every exact prunable group (in every weight that scores it);
    prune-units with `threshold=0` must remove exactly those units from every member and leave
    the outputs unchanged. (No cleanup: it would merge copies that stay equal.)"""
    model = model_from_text(case.read_text())
    unshare_constants(model)
    model.infer_shapes()
    deps = analyze(model)
    dead = {g.id: set(range(1, g.units, 2)) for g in deps.prunable if g.exact}
    consts = model.constants()
    for group in deps.prunable:
        for member in group.scored_weights if group.id in dead else ():
            values = np.asarray(consts[member.tensor].values).copy()
            index = [slice(None)] * values.ndim
            index[member.axis] = [member.start + u for u in sorted(dead[group.id])]
            values[tuple(index)] = 0
            consts[member.tensor].values = values
    expected_params = 0
    for tensor in model.weights():
        kept = [sum(stop - start - len(dead.get(gid, ())) for start, stop, gid in deps.segments[(tensor.name, axis)])
                if (tensor.name, axis) in deps.segments else size for axis, size in enumerate(tensor.values.shape)]
        expected_params += int(np.prod(kept))
    proto = model.to_onnx()
    feeds = runtime.sample_inputs(proto, seed=2)
    before = runtime.run(proto, feeds)
    report = graphprune.prune(model, "deps,importance,prune{threshold=0},verify")
    after = runtime.run(model.to_onnx(), feeds)
    assert report.verified and report.params_after == expected_params
    for a, b in zip(after, before, strict=True):
        assert a.shape == b.shape
        assert np.max(np.abs(a - b), initial=0.0) <= 1e-6 * max(1.0, float(np.max(np.abs(b), initial=0.0)))
