"""Every package in the tree is listed for setuptools, so a wheel (not only an editable install)
holds all of graphprune."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed() -> None:
    line = re.search(r"^packages = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    listed = {name.strip().strip('"') for name in line.group(1).split(",")}
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "graphprune").rglob("__init__.py")
             if not init.parent.is_symlink()}
    found |= {"graphprune.passes", "graphprune.models"}  # mapped from the top-level passes/ and models/
    assert found == listed
