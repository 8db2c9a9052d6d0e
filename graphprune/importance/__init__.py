"""Importance criteria, one module each, registered as scorers by `--importance` kind.

`magnitude` (l1, l2, random, saliency), `activation` (activation / wanda-sp, flap), `obs`
(structured OBS) and `taylor` (taylor, fisher); `base` defines the `Scorer` contract. None imports
torch until it runs: `taylor` lowers the graph to torch when it scores.
"""

from graphprune.importance import activation, magnitude, obs, taylor  # noqa: F401 - registers the scorers
from graphprune.importance.base import SCORERS, Importance, Scorer, register_scorer, unit_rows


def scorer_for(kind: str) -> Scorer:
    if kind not in SCORERS:
        raise KeyError(f"no importance criterion {kind!r}; known: {', '.join(sorted(SCORERS))}")
    return SCORERS[kind]


__all__ = ["SCORERS", "Importance", "Scorer", "register_scorer", "scorer_for", "unit_rows"]
