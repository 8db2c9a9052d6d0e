"""Property tests over random graphs beyond chains (graphprune.testing.fuzz.mlp_graphs): Split/Concat, Slice,
residual Adds, branches, per-channel scales. Every random graph must (1) prune at any ratio into a
verified model and (2) lose exactly its dead units, with identical outputs, under `threshold=0`."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import graphprune
from graphprune.testing import check_dead_unit_removal, model_from_text
from graphprune.testing.fuzz import mlp_graphs

SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(text=mlp_graphs(), ratio=st.floats(0.0, 0.9), round_to=st.sampled_from((1, 2, 4)))
def test_random_graphs_prune_into_verified_models(text: str, ratio: float, round_to: int) -> None:
    model = model_from_text(text)
    prunable = graphprune.inspect(model).prunable
    report = graphprune.prune(model, ratio=ratio, round_to=round_to)
    assert report.verified
    assert report.params_after <= report.params_before
    if prunable and ratio >= 0.5 and round_to == 1:
        assert report.params_after < report.params_before


@SETTINGS
@given(text=mlp_graphs(), seed=st.integers(0, 2**16))
def test_random_graphs_lose_exactly_their_dead_units(text: str, seed: int) -> None:
    rng = np.random.default_rng(seed)

    def choose(group) -> set[int]:
        count = int(rng.integers(0, group.units))  # fewer than all
        return set(rng.choice(group.units, size=count, replace=False).tolist())

    check_dead_unit_removal(model_from_text(text), choose)
