"""Golden dependency cases: tests/golden/<op family>/<case>.onnx.txt (ONNX text) beside
<case>.expected, one folder per module of `graphprune.ops` (and `unsupported/` for graphs with ops
that have no rule).

Each case is analysed (as `graphprune inspect` sees it) and its groups rendered as text must equal
the expected file. Then the case is pruned at ratio 0.5 through the verifying pass manager: the
result must pass onnx.checker and ORT with unchanged output shapes, and lose parameters exactly
when some group is prunable. Set GRAPHPRUNE_UPDATE_GOLDEN=1 to write a missing expected file
(then read it: the expected text is the test's claim).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import graphprune
from graphprune.analysis.deps import render
from graphprune.testing import check_dead_unit_removal, model_from_text

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(GOLDEN.rglob("*.onnx.txt"))
IDS = [str(c.relative_to(GOLDEN)).removesuffix(".onnx.txt") for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_golden_groups(case: Path) -> None:
    model = model_from_text(case.read_text())
    rendered = render(graphprune.inspect(model))
    expected_path = case.with_name(case.name.removesuffix(".onnx.txt") + ".expected")
    if not expected_path.exists():
        if os.environ.get("GRAPHPRUNE_UPDATE_GOLDEN"):
            expected_path.write_text(rendered)
        pytest.fail(f"no expected file for {case.name}; rendered groups:\n{rendered}")
    assert rendered == expected_path.read_text()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_golden_prunes_and_verifies(case: Path) -> None:
    model = model_from_text(case.read_text())
    prunable = graphprune.inspect(model).prunable
    before = model.param_count()
    report = graphprune.prune(model, ratio=0.5, prune_hidden=True)
    assert report.verified
    if prunable:
        assert report.params_after < before
        assert any(g["units_after"] < g["units_before"] for g in report.groups)
    else:
        assert report.params_after == before


def test_every_case_has_expected_file() -> None:
    missing = [c.name for c in CASES if not c.with_name(c.name.removesuffix(".onnx.txt") + ".expected").exists()]
    assert not missing


def test_cases_sit_in_their_op_familys_folder() -> None:
    """Every folder is an ops module (or `unsupported`), and nothing is left at the top."""
    from graphprune import ops

    families = {name for name in dir(ops) if not name.startswith("_")}
    assert {c.parent.name for c in CASES} <= families | {"unsupported"}
    assert not list(GOLDEN.glob("*.onnx.txt"))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_golden_dead_units_are_removed_exactly(case: Path) -> None:
    """Zero every odd unit of every exact prunable group (in every weight that scores it);
    prune-units with `threshold=0` must remove exactly those units from every member and leave
    the outputs unchanged. (No cleanup: it would merge copies that stay equal.)"""
    model = model_from_text(case.read_text())
    check_dead_unit_removal(model, lambda group: set(range(1, group.units, 2)))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_golden_lowering_matches_onnx_runtime(case: Path) -> None:
    """Every golden graph lowers to an fx module that computes what ONNX Runtime computes; a graph
    with an op the lowering lacks (control flow, unknown ops) is refused with its name."""
    from graphprune.ops import spec_of
    from graphprune.testing import check_lowering
    from graphprune.torch.lowering import LoweringError

    model = model_from_text(case.read_text())
    missing = sorted({n.op for n in model.graph.nodes if spec_of(n) is None or spec_of(n).lowering is None})
    if missing:
        with pytest.raises(LoweringError, match=f"cannot lower {missing[0]}"):
            check_lowering(model)
    else:
        check_lowering(model)
