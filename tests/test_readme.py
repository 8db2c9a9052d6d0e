"""The README's Python examples run as written (in a temporary folder)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    out = capsys.readouterr().out
    assert "sparsity" in out and "[(10, 10), (10,), (10, 10), (10,)]" in out and "(3, 10)" in out
    assert (tmp_path / "simple_taylor.onnx").exists()


def test_readme_gives_exactly_two_setup_commands() -> None:
    bash_blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.DOTALL)
    setup = [b.strip() for b in bash_blocks[:2]]
    assert setup[0].endswith("graphprune demo") and "pytest" in setup[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert setup[1] == "bash .ci/setup && python -m pytest -q"
    assert "bash .ci/setup" in ci and "python -m pytest -q" in ci
    assert "-c constraints.txt -e '.[test]'" in (README.parent / ".ci" / "setup").read_text()
