"""Control flow: If, Loop and Scan hold subgraphs, which graphprune does not look inside. They are
registered without a rule or a lowering, so the units their inputs and outputs touch stay frozen
and lowering refuses the graph, each with this note as the reason."""

from __future__ import annotations

from graphprune.ops.base import ELEMENTWISE
from graphprune.ops.registry import register

NOTE = "control flow: graphprune does not look inside subgraphs"


for _op in ("If", "Loop", "Scan"):
    register(_op, cost=ELEMENTWISE, note=NOTE)
