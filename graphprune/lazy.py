"""Modules imported on first use: code that names `torch.relu` or `F.softmax` in a function body
loads without torch, and torch is imported when such a function first runs."""

from __future__ import annotations

import importlib
from typing import Any


class OnFirstUse:
    """A module imported when an attribute is first read."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)


torch: Any = OnFirstUse("torch")
F: Any = OnFirstUse("torch.nn.functional")  # noqa: N816 - torch's own name for it
