"""Calibration data (--calib) and activation-aware importance."""

from __future__ import annotations

import re

import numpy as np
import pytest

import graphprune
from graphprune.analysis.deps import analyze
from graphprune.calib import CalibrationError, load_calibration, random_calibration
from graphprune.importance.activation import activation_scores
from graphprune.testing import model_from_text
from graphprune.tools.cli import main

MLP = """
# weights: w1 b1 w2
<ir_version: 10, opset_import: ["" : 20]>
mlp (float[N, 4] x, float[4, 6] w1, float[6] b1, float[6, 3] w2) => (float[N, 3] y)
{
  m = MatMul (x, w1)
  h = Add (m, b1)
  r = Relu (h)
  y = MatMul (r, w2)
}"""


def _mlp():
    model = model_from_text(MLP)
    consts = model.constants()
    b1 = np.zeros(6, np.float32)
    b1[0] = -100.0  # unit 0 never fires: relu(h0) == 0 on any reasonable input
    consts["b1"].values = b1
    w2 = np.asarray(consts["w2"].values).copy()
    w2[0] *= 50  # ... but has by far the largest weights
    consts["w2"].values = w2
    model.infer_shapes()
    return model


def test_activation_scores_follow_the_wanda_formula_and_see_dead_activations() -> None:
    model = _mlp()
    deps = analyze(model)
    (group,) = deps.prunable
    feeds = random_calibration(model.to_onnx(), samples=64, seed=3)
    scores = activation_scores(model, deps, feeds)[group.id]
    x = feeds["x"].astype(np.float64)
    consts = model.constants()
    r = np.maximum(x @ consts["w1"].values + consts["b1"].values, 0)
    expected = np.sqrt(np.square(r).sum(axis=0)) * np.abs(consts["w2"].values).sum(axis=1)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert scores.argmin() == 0
    l2 = graphprune.api.preview(model, ratio=0.5, importance="l2")[1][group.id]
    assert l2 == 3
    pruned = _mlp()
    graphprune.prune(pruned, ratio=0.5, importance="activation", calibration=feeds)
    assert pruned.constants()["w2"].values.shape == (3, 3)
    kept_rows = pruned.constants()["w2"].values
    assert not np.any(np.all(np.isclose(kept_rows, consts["w2"].values[0]), axis=1))  # unit 0 went


def test_calibration_files_are_checked(tmp_path) -> None:
    proto = _mlp().to_onnx()
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((5, 4), np.float32))
    assert load_calibration(good, proto)["x"].shape == (5, 4)
    cases = {
        "missing.npz": None,
        "garbage.npz": b"not a zip archive",
        "other.npz": {"z": np.zeros((5, 4), np.float32)},
        "shape.npz": {"x": np.zeros((5, 3), np.float32)},
        "dtype.npz": {"x": np.zeros((5, 4), np.complex64)},
        "empty.npz": {"x": np.zeros((0, 4), np.float32)},
    }
    messages = {"missing.npz": "does not exist", "garbage.npz": "not a readable .npz",
                "other.npz": "has no array 'x' (it has: z)", "shape.npz": "has shape [5, 3]",
                "dtype.npz": "is complex64", "empty.npz": "holds no samples"}
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            np.savez(path, **content)
        with pytest.raises(CalibrationError, match=re.escape(messages[name])):
            load_calibration(path, proto)


def test_cli_activation_importance_with_calibration(tmp_path, trained_simple_net, capsys) -> None:
    path = trained_simple_net.path
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=trained_simple_net.x.numpy()[:64])
    for spec in (str(calib), "random"):
        out = tmp_path / "p.onnx"
        assert main(["prune", str(path), "-o", str(out), "--ratio", "0.5", "--importance", "activation",
                     "--calib", spec]) == 0
        assert graphprune.load_model(out).param_count() == 220
    bad = tmp_path / "bad.npz"
    np.savez(bad, y=np.zeros((2, 10), np.float32))
    before = path.read_bytes()
    assert main(["prune", str(path), "-o", str(tmp_path / "q.onnx"), "--ratio", "0.5", "--importance",
                 "activation", "--calib", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no array 'x'" in err
    assert not (tmp_path / "q.onnx").exists() and path.read_bytes() == before


def test_cli_calib_turns_text_into_token_inputs(tmp_path, capsys) -> None:
    from graphprune.models.minilm import english_sentences, model_path

    model = model_from_text("""
    <ir_version: 10, opset_import: ["" : 20]>
    tokens (int64[N, S] input_ids, int64[N, S] attention_mask) => (int64[N, S] y)
    {
      y = Add (input_ids, attention_mask)
    }""")
    onnx_path = graphprune.save_model(model, tmp_path / "m.onnx")
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(english_sentences()[:12]))
    out = tmp_path / "calib.npz"
    assert main(["calib", str(text), "--model", str(onnx_path), "--tokenizer", model_path(), "-o", str(out),
                 "--seq", "32", "--samples", "10"]) == 0
    feeds = load_calibration(out, model.to_onnx())
    assert feeds["input_ids"].shape == (10, 32) and feeds["attention_mask"].sum(axis=1).min() > 5
    assert main(["calib", str(tmp_path / "none.txt"), "--model", str(onnx_path), "--tokenizer", model_path(),
                 "-o", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_reconstruct_refits_the_consumer_by_least_squares() -> None:
    """After half the hidden units go, the second layer is refit on calibration data: its weights
    are the ridge solution of the kept activations against the dense outputs, and the pruned
    model's output error on held-out inputs drops."""
    from graphprune import runtime

    dense = model_from_text(MLP, seed=4)
    calib = random_calibration(dense.to_onnx(), samples=256, seed=1)
    held_out = random_calibration(dense.to_onnx(), samples=64, seed=2)
    reference = runtime.run(dense.to_onnx(), held_out)[0]

    def error(model) -> float:
        return float(np.mean(np.square(runtime.run(model.to_onnx(), held_out)[0] - reference)))

    plain, refit = model_from_text(MLP, seed=4), model_from_text(MLP, seed=4)
    graphprune.prune(plain, ratio=0.5, calibration=calib)
    report = graphprune.prune(refit, ratio=0.5, calibration=calib, reconstruct=True)
    stats = next(p.stats for p in report.passes if p.name == "reconstruct")
    assert report.verified and stats["layers_refit"] == 1
    assert stats["relative_error_after"][0] < stats["relative_error_before"][0]
    assert error(refit) < 0.8 * error(plain)
    # the refit weights are the ridge least-squares solution
    kept = plain.constants()["w1"].values  # same units kept in both (same l2 scores)
    consts = dense.constants()
    x = calib["x"].astype(np.float64)
    hidden = np.maximum(x @ consts["w1"].values + consts["b1"].values, 0)
    columns = [next(j for j in range(6) if np.array_equal(consts["w1"].values[:, j], kept[:, i]))
               for i in range(kept.shape[1])]
    xk, y = hidden[:, columns], hidden @ consts["w2"].values
    gram = xk.T @ xk
    expected = np.linalg.solve(gram + 0.01 * np.mean(np.diag(gram)) * np.eye(len(gram)), xk.T @ y)
    np.testing.assert_allclose(refit.constants()["w2"].values, expected, rtol=1e-4, atol=1e-5)


def test_reconstruct_needs_a_prune_before_it() -> None:
    from graphprune.errors import OptionError

    with pytest.raises(OptionError, match="must follow prune-units"):
        graphprune.prune(model_from_text(MLP), "reconstruct,verify")


def test_taylor_scores_estimate_the_squared_output_change() -> None:
    """For y = relu(x W1 + b1) W2, removing hidden unit u changes y by 2 r_u W2[u] to first order
    (r_u: the unit's activation; W2 and the relu-scaled W1 column each give one r_u W2[u]), so the
    label-free Taylor score is 4 * sum over samples of r_u^2 * ||W2[u]||^2."""
    from graphprune.importance.taylor import taylor_scores

    model = _mlp()
    deps = analyze(model)
    (group,) = deps.prunable
    feeds = random_calibration(model.to_onnx(), samples=64, seed=3)
    scores = taylor_scores(model, deps, feeds, draws=400, batch=64, squared=True)[group.id]
    consts = model.constants()
    r = np.maximum(feeds["x"].astype(np.float64) @ consts["w1"].values + consts["b1"].values, 0)
    expected = 4 * np.square(r).sum(axis=0) * np.square(consts["w2"].values).sum(axis=1)
    assert scores[0] == 0 and expected[0] == 0  # the unit that never fires
    np.testing.assert_allclose(scores[1:], expected[1:], rtol=0.25)
    assert np.array_equal(np.argsort(scores), np.argsort(expected))
    # the first-order form: c_u is Gaussian along random directions, so E|c_u| = sqrt(2/pi) sqrt(E c_u^2)
    first = taylor_scores(model, deps, feeds, draws=400, batch=64)[group.id]
    np.testing.assert_allclose(first[1:], np.sqrt(2 / np.pi * expected[1:]), rtol=0.15)


def test_taylor_with_labels_uses_the_task_loss() -> None:
    """With class labels, c_u = sum over the unit's weights of dCE/dw * w, computed here by hand
    with torch; taylor averages |c_u| over batches, fisher c_u^2."""
    import torch

    from graphprune.importance.taylor import taylor_scores

    model = _mlp()
    deps = analyze(model)
    (group,) = deps.prunable
    feeds = random_calibration(model.to_onnx(), samples=32, seed=5)
    labels = np.random.default_rng(5).integers(0, 3, 32)
    consts = model.constants()
    expected = []
    for start in (0, 16):
        w1, b1, w2 = (torch.tensor(np.asarray(consts[n].values, np.float64), requires_grad=True)
                      for n in ("w1", "b1", "w2"))
        x = torch.tensor(feeds["x"][start:start + 16], dtype=torch.float64)
        y = torch.relu(x @ w1 + b1) @ w2
        torch.nn.functional.cross_entropy(y, torch.tensor(labels[start:start + 16]), reduction="sum").backward()
        c = (w1.grad * w1).sum(0) + b1.grad * b1 + (w2.grad * w2).sum(1)
        expected.append(c.detach().numpy())
    expected = np.array(expected)
    taylor = taylor_scores(model, deps, feeds, labels=labels)[group.id]
    fisher = taylor_scores(model, deps, feeds, labels=labels, squared=True)[group.id]
    np.testing.assert_allclose(taylor, np.abs(expected).mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fisher, np.square(expected).mean(0), rtol=1e-4, atol=1e-8)
    with pytest.raises(CalibrationError, match="do not fit the first output"):
        taylor_scores(model, deps, feeds, labels=np.zeros((32, 2), np.int64))


def test_cli_reads_labels_from_the_calibration_file(tmp_path) -> None:
    from graphprune.calib import load_labels

    model = _mlp()
    path = graphprune.save_model(model, tmp_path / "m.onnx")
    calib = tmp_path / "calib.npz"
    feeds = random_calibration(model.to_onnx(), samples=32, seed=5)
    np.savez(calib, x=feeds["x"], labels=np.arange(32) % 3)
    assert load_labels(calib, model.to_onnx()).tolist() == (np.arange(32) % 3).tolist()
    assert set(load_calibration(calib, model.to_onnx())) == {"x"}
    for kind in ("taylor", "fisher"):
        out = tmp_path / f"{kind}.onnx"
        assert main(["prune", str(path), "-o", str(out), "--ratio", "0.5", "--importance", kind,
                     "--calib", str(calib)]) == 0
        assert graphprune.load_model(out).constants()["w2"].values.shape == (3, 3)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=feeds["x"], labels=np.zeros(5, np.int64))
    assert main(["prune", str(path), "-o", str(tmp_path / "b.onnx"), "--ratio", "0.5", "--importance", "taylor",
                 "--calib", str(bad)]) == 1


RESIDUAL_MLP = """
# weights: a1 b1 a2 b2
<ir_version: 10, opset_import: ["" : 20]>
resmlp (float[N, 4] x, float[4, 8] a1, float[8, 4] b1, float[4, 8] a2, float[8, 4] b2) => (float[N, 4] y)
{
  p1 = MatMul (x, a1)
  r1 = Relu (p1)
  o1 = MatMul (r1, b1)
  h1 = Add (x, o1)
  p2 = MatMul (h1, a2)
  r2 = Relu (p2)
  o2 = MatMul (r2, b2)
  y = Add (h1, o2)
}"""


def test_reconstruct_also_makes_up_for_the_residual_streams_drift() -> None:
    """Block 2's output is added to h1, which block 1's pruning moved: with `residual`, block 2 is
    refit to the dense sum h1 + o2, so the final output error drops below the plain refit's."""
    from graphprune import runtime
    from graphprune.passes.reconstruct import consumers_of_removed

    dense = model_from_text(RESIDUAL_MLP, seed=7)
    calib = random_calibration(dense.to_onnx(), samples=256, seed=1)
    held_out = random_calibration(dense.to_onnx(), samples=64, seed=2)
    reference = runtime.run(dense.to_onnx(), held_out)[0]
    errors = {}
    for residual in (False, True):
        model = model_from_text(RESIDUAL_MLP, seed=7)
        pipeline = f"unshare,deps,importance,prune{{ratio=0.5}},reconstruct{{residual={str(residual).lower()}}},verify"
        graphprune.prune(model, pipeline, calibration=calib)
        errors[residual] = float(np.mean(np.square(runtime.run(model.to_onnx(), held_out)[0] - reference)))
    assert [c.residual for c in consumers_of_removed(model, dense, {})] == ["x", "h1"]
    assert errors[True] < errors[False]
    # block 2's weights are the ridge solution for the target o2 + (h1 dense - h1 pruned)
    ours, theirs = ({n: np.asarray(v.values, np.float64) for n, v in m.constants().items()} for m in (model, dense))
    x = calib["x"].astype(np.float64)
    h1_dense = x + np.maximum(x @ theirs["a1"], 0) @ theirs["b1"]
    h1 = x + np.maximum(x @ ours["a1"], 0) @ ours["b1"]
    r2 = np.maximum(h1 @ ours["a2"], 0)
    target = np.maximum(h1_dense @ theirs["a2"], 0) @ theirs["b2"] + h1_dense - h1
    gram = r2.T @ r2
    expected = np.linalg.solve(gram + 0.01 * np.mean(np.diag(gram)) * np.eye(len(gram)), r2.T @ target)
    np.testing.assert_allclose(ours["b2"], expected, rtol=1e-4, atol=1e-5)


def test_cli_taylor_importance(tmp_path, trained_simple_net) -> None:
    out = tmp_path / "p.onnx"
    assert main(["prune", str(trained_simple_net.path), "-o", str(out), "--ratio", "0.5", "--importance",
                 "taylor", "--calib", "random", "--reconstruct"]) == 0
    assert graphprune.load_model(out).param_count() == 220


def test_obs_removes_redundant_units_first_and_scores_the_refit_error() -> None:
    """Columns 0 and 1 of X carry the same signal with large weights; column 2 is independent with
    small weights. Magnitude scores would drop unit 2; OBS drops one of the twins (the other takes
    over its weight at no cost), and its first step's score is the exact ridge refit error."""
    from graphprune.importance.obs import greedy_removal

    rng = np.random.default_rng(0)
    base = rng.standard_normal((500, 3))
    x = np.column_stack([base[:, 0], base[:, 0], base[:, 1], base[:, 2]])
    w = np.array([[3.0, 1.0], [2.0, -1.0], [0.3, 0.2], [1.5, 2.0]])
    gram = x.T @ x
    scores = greedy_removal(gram, w, units=4, damp=1e-9)
    first = int(np.argmin(scores))
    assert first in (0, 1) and scores[first] < 1e-6
    assert np.argsort(scores)[1] == 2 and scores.argmax() in (0, 1, 3)
    # heads: blocks of 2 columns; the first block's score is the refit error of the other blocks
    x2 = rng.standard_normal((400, 6))
    w2 = rng.standard_normal((6, 3))
    gram2 = x2.T @ x2
    scores2 = greedy_removal(gram2, w2, units=3, damp=1e-9)
    gone = int(np.argmin(scores2))
    keep = [c for c in range(6) if c // 2 != gone]
    refit, *_ = np.linalg.lstsq(x2[:, keep], x2 @ w2, rcond=None)
    error = np.sum(np.square(x2[:, keep] @ refit - x2 @ w2)) / np.sum(np.square(x2 @ w2))
    assert scores2[gone] == pytest.approx(error, rel=1e-5)


def test_obs_importance_prunes_a_verified_model(tmp_path, trained_simple_net) -> None:
    out = tmp_path / "p.onnx"
    assert main(["prune", str(trained_simple_net.path), "-o", str(out), "--ratio", "0.5", "--importance", "obs",
                 "--calib", "random", "--reconstruct"]) == 0
    assert graphprune.load_model(out).param_count() == 220


def test_reconstruct_refits_convolutions_and_layers_between_pruned_ones() -> None:
    """DigitsCNN at 0.5: conv2 and conv3 (input and output channels both pruned) are refit on their
    im2col patches against the dense output's kept channels, as are both linear layers; the
    held-out output error drops well below plain pruning's."""
    import torch

    from graphprune import runtime
    from graphprune.models.digits import DigitsCNN

    torch.manual_seed(0)
    net = DigitsCNN()
    dense = graphprune.from_torch(net, net.example_inputs(), input_names=["image"], dynamic_batch=True)
    rng = np.random.default_rng(0)
    calib = {"image": rng.random((640, 1, 8, 8), dtype=np.float32)}  # more samples than fc1 inputs
    held_out = {"image": rng.random((64, 1, 8, 8), dtype=np.float32)}
    reference = runtime.run(dense.to_onnx(), held_out)[0]
    errors, stats = {}, None
    for reconstruct in (False, True):
        model = dense.copy()
        report = graphprune.prune(model, ratio=0.5, calibration=calib, reconstruct=reconstruct,
                                  importance="l2")  # magnitude leaves every layer something to refit
        errors[reconstruct] = float(np.mean(np.square(runtime.run(model.to_onnx(), held_out)[0] - reference)))
        stats = next((p.stats for p in report.passes if p.name == "reconstruct"), stats)
    assert stats["layers_refit"] == 4
    assert all(a < b for a, b in zip(stats["relative_error_after"], stats["relative_error_before"], strict=True))
    assert errors[True] < 0.5 * errors[False]


def test_reconstruct_keeps_layers_it_cannot_determine(caplog) -> None:
    """Two calibration samples for three kept inputs: the refit would memorize them, so the layer
    stays as plain pruning left it, with a warning that asks for more samples."""
    plain, refit = model_from_text(MLP, seed=4), model_from_text(MLP, seed=4)
    calib = random_calibration(plain.to_onnx(), samples=2, seed=1)
    graphprune.prune(plain, ratio=0.5, calibration=calib)
    report = graphprune.prune(refit, ratio=0.5, calibration=calib, reconstruct=True)
    stats = next(p.stats for p in report.passes if p.name == "reconstruct")
    np.testing.assert_array_equal(refit.constants()["w2"].values, plain.constants()["w2"].values)
    assert stats["relative_error_after"] == stats["relative_error_before"]
    assert "2 calibration rows for 3 inputs" in caplog.text


BIASED_MLP = """
# weights: w1 b1 w2 b2
<ir_version: 10, opset_import: ["" : 20]>
mlp (float[N, 4] x, float[4, 6] w1, float[6] b1, float[6, 3] w2, float[3] b2) => (float[N, 3] y)
{
  m = MatMul (x, w1)
  h = Add (m, b1)
  r = Relu (h)
  z = MatMul (r, w2)
  y = Add (z, b2)
}"""


@pytest.mark.parametrize("text", [MLP, BIASED_MLP])
def test_flap_folds_the_removed_units_mean_into_the_next_bias(text) -> None:
    """FLAP's bias compensation: with half the hidden units gone, the pruned model's mean output
    over the calibration data equals the dense model's (a new bias Add, or the existing bias
    constant, takes mean(removed activations) @ their weight rows); without it, it does not."""
    from graphprune import runtime

    dense = model_from_text(text, seed=6)
    feeds = random_calibration(dense.to_onnx(), samples=200, seed=3)
    reference = runtime.run(dense.to_onnx(), feeds)[0].mean(axis=0)
    flap, plain = model_from_text(text, seed=6), model_from_text(text, seed=6)
    report = graphprune.prune(flap, ratio=0.5, importance="flap", calibration=feeds)
    graphprune.prune(plain, pipeline="unshare,deps,importance{kind=flap},prune{ratio=0.5},cleanup,verify",
                     calibration=feeds)
    stats = next(p.stats for p in report.passes if p.name == "compensate-bias")
    assert report.verified and stats["layers_compensated"] == 1
    assert [t.name for t in flap.graph.outputs] == ["y"]
    np.testing.assert_allclose(runtime.run(flap.to_onnx(), feeds)[0].mean(axis=0), reference, rtol=1e-4, atol=1e-5)
    assert not np.allclose(runtime.run(plain.to_onnx(), feeds)[0].mean(axis=0), reference, rtol=1e-3, atol=1e-3)
    # MLP gains a bias Add after w2; BIASED_MLP's b2 constant takes the shift (no new node)
    assert [n.op for n in flap.graph.nodes].count("Add") == 2
