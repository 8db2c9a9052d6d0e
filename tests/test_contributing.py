"""The README's Contributing examples (an op, a criterion, a pass) run as written, each in a fresh
interpreter: they register things, which must not leak into the other tests."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = README.read_text().split("## Contributing", 1)[1].split("\n## ", 1)[0]
EXAMPLES = re.findall(r"```py\n(.*?)```", SECTION, re.DOTALL)


def test_there_is_an_example_for_an_op_a_criterion_and_a_pass() -> None:
    assert [example.splitlines()[0] for example in EXAMPLES] == [
        "# graphprune/ops/elementwise.py", "# graphprune/importance/magnitude.py", "# passes/round_weights.py"]
    assert all(len(example.splitlines()) <= 30 for example in EXAMPLES)  # short enough to read at once


@pytest.mark.parametrize("example", EXAMPLES, ids=["op", "criterion", "pass"])
def test_contributing_example_runs(example: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-5:]
