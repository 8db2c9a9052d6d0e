"""score-importance: magnitudes aggregated over every member of a group, random seeded."""

from __future__ import annotations

import numpy as np
import pytest

import graphprune
from graphprune.analysis.deps import Dependencies
from graphprune.pipeline import AnalysisManager, parse_pipeline


def _scores(model, text: str):
    model.infer_shapes()
    am = AnalysisManager()
    result = am.run(parse_pipeline(text)[0], model)
    (group,) = am.get(Dependencies, model).prunable
    return result.scores[group.id]


def _weights(model):
    consts = {name: np.asarray(t.values, np.float64) for name, t in model.constants().items()}
    return consts["fc1.weight"], consts["fc1.bias"], consts["fc2.weight"]


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_magnitude_sums_producer_rows_biases_and_consumer_columns(trained_simple_net, kind) -> None:
    model = graphprune.load_model(trained_simple_net.path)
    w1, b1, w2 = _weights(model)
    if kind == "l1":
        expected = np.abs(w1).sum(1) + np.abs(b1) + np.abs(w2).sum(0)
    else:
        expected = np.sqrt((w1 ** 2).sum(1) + b1 ** 2 + (w2 ** 2).sum(0))
    np.testing.assert_allclose(_scores(model, f"importance{{kind={kind}}}"), expected, rtol=1e-12)


def test_random_is_seeded(trained_simple_net) -> None:
    model = graphprune.load_model(trained_simple_net.path)
    a = _scores(model, "importance{kind=random,seed=1}")
    b = _scores(model, "importance{kind=random,seed=1}")
    c = _scores(model, "importance{kind=random,seed=2}")
    assert np.array_equal(a, b) and not np.array_equal(a, c) and a.shape == (20,)


def test_saliency_without_contributions_is_an_error(trained_simple_net) -> None:
    model = graphprune.load_model(trained_simple_net.path)
    with pytest.raises(graphprune.GraphpruneError, match="needs per-weight contributions"):
        graphprune.prune(model, ratio=0.5, importance="saliency")


def test_ratio_keeps_the_highest_scores(trained_simple_net) -> None:
    model = graphprune.load_model(trained_simple_net.path)
    w1, b1, w2 = _weights(model)
    l1 = np.abs(w1).sum(1) + np.abs(b1) + np.abs(w2).sum(0)
    keep = np.sort(np.argsort(-l1, kind="stable")[:14])
    graphprune.prune(model, ratio=0.3, importance="l1")
    assert np.array_equal(np.asarray(model.constants()["fc1.bias"].values, np.float64), b1[keep])


def test_default_rounding_keeps_multiples_of_8_in_large_groups_only() -> None:
    from graphprune.transform.plan import kept_count

    assert kept_count(64, 0.3, None) == 48  # 45 kept -> 48
    assert kept_count(20, 0.3, None) == 14  # small group: no rounding
    assert kept_count(64, 0.3, 1) == 45 and kept_count(64, 0.3, 16) == 48
