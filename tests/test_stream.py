"""Block-streamed calibration (graphprune.stream) and the one-pass prune-sequential."""

from __future__ import annotations

import numpy as np
import pytest

import graphprune
from graphprune import runtime, stream
from graphprune.calib import random_calibration
from graphprune.importance.obs import refit_rows
from graphprune.testing import model_from_text

# two residual blocks (FFN: up, relu, down) and a head that nothing below asks for
BLOCKS = """
# weights: u1 d1 u2 d2 head
<ir_version: 10, opset_import: ["" : 20]>
blocks (float[N, 4] x) => (float[N, 5] logits)
{
  a1 = MatMul (x, u1)
  r1 = Relu (a1)
  f1 = MatMul (r1, d1)
  h1 = Add (x, f1)
  a2 = MatMul (h1, u2)
  r2 = Relu (a2)
  f2 = MatMul (r2, d2)
  h2 = Add (h1, f2)
  logits = MatMul (h2, head)
}"""
SHAPES = {"u1": (4, 16), "d1": (16, 4), "u2": (4, 16), "d2": (16, 4), "head": (4, 5)}


def _blocks(seed: int = 0):
    """BLOCKS with weights of the declared shapes (the text's inputs carry no shapes for them)."""
    text = BLOCKS.replace("(float[N, 4] x)", "(float[N, 4] x, " + ", ".join(
        f"float[{a}, {b}] {name}" for name, (a, b) in SHAPES.items()) + ")")
    model = model_from_text(text, seed=seed)
    model.infer_shapes()
    return model


def _reference(model, feeds: dict, names: list[str]) -> dict[str, np.ndarray]:
    proto = runtime.with_outputs(model.to_onnx(), dict.fromkeys(names, np.float32))
    return dict(zip(names, runtime.session(proto).run(names, feeds), strict=True))


def test_walk_hands_out_each_tensor_as_the_whole_model_computes_it_and_skips_unneeded_nodes() -> None:
    model = _blocks()
    feeds = random_calibration(model.to_onnx(), samples=37, seed=1)
    expected = _reference(model, feeds, ["r1", "r2"])
    walk = stream.Walk(model, ["r1", "r2"], feeds, batch=8)
    assert len(walk) == 5 and [n.op for n in walk.nodes].count("MatMul") == 3  # no d2, no head
    down = next(n for n in model.graph.nodes if n.outputs[0].name == "f1")
    first = dict(walk.advance(until=down))
    assert sorted(first[0]) == ["r1"]
    assert set(walk.live(0)) == {"x", "r1"}  # what the rest still reads, nothing else
    rest = dict(walk.advance())
    walk.close()
    got_r1 = np.concatenate([first[i]["r1"] for i in range(len(walk))])
    got_r2 = np.concatenate([rest[i]["r2"] for i in range(len(walk))])
    np.testing.assert_allclose(got_r1, expected["r1"], rtol=1e-6)
    np.testing.assert_allclose(got_r2, expected["r2"], rtol=1e-5, atol=1e-6)


def test_walk_runs_later_stretches_with_weights_changed_in_between_and_spills_to_disk(monkeypatch) -> None:
    monkeypatch.setattr(stream, "MEMORY_BYTES", 256)  # every live tensor of a batch goes to a file
    model = _blocks()
    feeds = random_calibration(model.to_onnx(), samples=20, seed=2)
    walk = stream.Walk(model, ["r2"], feeds, batch=8)
    down = next(n for n in model.graph.nodes if n.outputs[0].name == "f1")
    for _ in walk.advance(until=down):
        pass
    assert walk.store.folder is not None and walk.store.files > 0
    consts = model.constants()
    consts["d1"].values = np.zeros_like(consts["d1"].values)  # block 1 now adds nothing
    got = np.concatenate([values["r2"] for _, values in walk.advance()])
    walk.close()
    x = feeds["x"].astype(np.float64)
    np.testing.assert_allclose(got, np.maximum(x @ consts["u2"].values, 0), rtol=1e-5, atol=1e-6)


def test_prune_sequential_refits_each_layer_on_the_stream_the_pruned_layers_before_it_make() -> None:
    dense = _blocks(seed=3)
    feeds = random_calibration(dense.to_onnx(), samples=400, seed=4)
    held_out = random_calibration(dense.to_onnx(), samples=100, seed=5)
    reference = runtime.run(dense.to_onnx(), held_out)[0]

    def error(model) -> float:
        return float(np.mean(np.square(runtime.run(model.to_onnx(), held_out)[0] - reference)))

    model, plain = _blocks(seed=3), _blocks(seed=3)
    report = graphprune.prune(model, ratio=0.5, importance="obs", reconstruct=True, calibration=feeds)
    names = [p.name for p in report.passes]
    assert "prune-sequential" in names and "reconstruct" not in names
    stats = next(p.stats for p in report.passes if p.name == "prune-sequential")
    assert report.verified and stats["layers_refit"] == 2
    assert all(a < b for a, b in zip(stats["relative_error_after"], stats["relative_error_before"], strict=True))
    consts = model.constants()
    assert consts["u1"].values.shape == (4, 8) and consts["d2"].values.shape == (8, 4)
    # block 2's refit: the least-squares fit of its kept units on the stream of the pruned block 1
    x = feeds["x"].astype(np.float64)
    h1 = x + np.maximum(x @ consts["u1"].values, 0) @ consts["d1"].values
    dense_consts = dense.constants()
    r2 = np.maximum(h1 @ dense_consts["u2"].values, 0)
    kept = [next(j for j in range(16) if np.allclose(dense_consts["u2"].values[:, j], consts["u2"].values[:, i]))
            for i in range(8)]
    gram = r2.T @ r2
    expected = refit_rows(gram, dense_consts["d2"].values.astype(np.float64), np.array(kept))
    np.testing.assert_allclose(consts["d2"].values, expected, rtol=2e-3, atol=1e-4)
    # and the refit pays: closer to the dense outputs than the same criterion without it
    graphprune.prune(plain, ratio=0.5, importance="obs", calibration=feeds)
    assert error(model) < 0.8 * error(plain)


@pytest.mark.parametrize(("options", "passes"), [
    ({"allocation": "uniform"}, ["prune-sequential"]),
    ({"allocation": "global"}, ["score-importance", "prune-units", "reconstruct"]),
    ({"uniform_heads": True, "allocation": "global"}, ["score-importance", "prune-units", "reconstruct"]),
])
def test_obs_with_reconstruct_runs_in_one_pass_when_the_budget_is_per_group(options, passes) -> None:
    names = [p.name for p in graphprune.api.build_passes(ratio=0.3, importance="obs", reconstruct=True, **options)]
    assert [n for n in names if n in ("prune-sequential", "score-importance", "prune-units", "reconstruct")] == passes
