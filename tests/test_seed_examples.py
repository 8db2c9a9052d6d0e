"""The seed's two examples done right: unstructured |w| < eps and Taylor-scored structural pruning."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

import graphprune
from graphprune.tools.demo import onnx_mse
from graphprune.torch import frontend


def test_unstructured_zeroes_small_weights_and_reports_sparsity(trained_simple_net, capsys) -> None:
    eps = 0.05
    model = graphprune.load_model(trained_simple_net.path)
    before = {t.name: np.asarray(t.values).copy() for t in model.weights()}
    x, y = trained_simple_net.x.numpy(), trained_simple_net.y.numpy()
    loss_before = onnx_mse(model, x, y)
    report = graphprune.prune(model, weight_threshold=eps)
    loss_after = onnx_mse(model, x, y)
    print(f"loss before {loss_before:.5f} after {loss_after:.5f}")
    stats = next(p.stats for p in report.passes if p.name == "sparsify-weights")

    zeroed = total = 0
    for tensor in model.weights():
        old, new = before[tensor.name], np.asarray(tensor.values)
        assert new.shape == old.shape
        if old.ndim < 2:  # biases are not sparsified
            assert np.array_equal(new, old)
            continue
        assert np.array_equal(new, np.where(np.abs(old) < eps, 0, old))
        zeroed += int(np.count_nonzero((np.abs(old) < eps) & (old != 0)))
        total += old.size
    assert zeroed > 0
    assert stats["zeroed"] == zeroed
    assert stats["sparsity"] == round(zeroed / total, 6)
    assert report.verified and report.params_after == report.params_before  # nothing shrinks by itself
    assert loss_after != loss_before and abs(loss_after - loss_before) < 0.1 * loss_before + 0.01
    assert "loss before" in capsys.readouterr().out

    again = graphprune.prune(model, weight_threshold=eps)
    assert next(p for p in again.passes if p.name == "sparsify-weights").modified is False


def test_sparsity_fraction_per_tensor(trained_simple_net) -> None:
    model = graphprune.load_model(trained_simple_net.path)
    graphprune.prune(model, sparsity=0.25)
    for tensor in model.weights():
        values = np.asarray(tensor.values)
        if values.ndim >= 2:
            assert np.count_nonzero(values == 0) == int(values.size * 0.25)


def test_structural_taylor_removes_hidden_units_physically(trained_simple_net, tmp_path) -> None:
    net, x, y = trained_simple_net.net, trained_simple_net.x, trained_simple_net.y
    saliency = frontend.taylor_saliency(net, torch.nn.functional.mse_loss, [(x, y)])
    # the contribution of a hidden unit: sum of dL/dw * w over its fc1 row, fc1 bias and fc2 column
    expected = np.abs(saliency["fc1.weight"].sum(axis=1) + saliency["fc1.bias"] + saliency["fc2.weight"].sum(axis=0))
    keep = np.sort(np.argsort(-expected, kind="stable")[:10])

    model = graphprune.load_model(trained_simple_net.path)
    report = graphprune.prune(model, ratio=0.5, importance="saliency",
                              saliency=frontend.saliency_for(model, net, saliency))
    out = graphprune.save_model(model, tmp_path / "pruned.onnx")

    weights = {t.name: np.asarray(t.values) for t in graphprune.load_model(out).weights()}
    w1, b1, w2 = (net.fc1.weight.detach().numpy(), net.fc1.bias.detach().numpy(), net.fc2.weight.detach().numpy())
    shapes = sorted(v.shape for v in weights.values())
    assert shapes == sorted([(10, 10), (10,), (10, 10), (10,)])  # 10 -> 10 -> 10
    assert any(np.array_equal(v, w1[keep]) for v in weights.values())
    assert any(np.array_equal(v, b1[keep]) for v in weights.values())
    assert any(np.array_equal(v, w2[:, keep]) for v in weights.values())
    assert report.params_before == 430 and report.params_after == 10 * 10 + 10 + 10 * 10 + 10

    session = ort.InferenceSession(str(out))
    batch = x[:7].numpy()
    (prediction,) = session.run(None, {"x": batch})
    with torch.no_grad():
        h = torch.relu(torch.from_numpy(batch) @ torch.from_numpy(w1[keep]).T + torch.from_numpy(b1[keep]))
        reference = h @ torch.from_numpy(w2[:, keep]).T + net.fc2.bias
    assert prediction.shape == (7, 10)
    np.testing.assert_allclose(prediction, reference.numpy(), rtol=1e-5, atol=1e-6)


def test_taylor_beats_random_on_average(trained_simple_net) -> None:
    net, x, y = trained_simple_net.net, trained_simple_net.x, trained_simple_net.y
    saliency = frontend.taylor_saliency(net, torch.nn.functional.mse_loss, [(x, y)])
    losses = {}
    for kind in ("saliency", "random"):
        runs = []
        for seed in range(3 if kind == "random" else 1):
            model = graphprune.load_model(trained_simple_net.path)
            graphprune.prune(model, ratio=0.5, importance=kind, seed=seed,
                             saliency=frontend.saliency_for(model, net, saliency))
            runs.append(onnx_mse(model, x.numpy(), y.numpy()))
        losses[kind] = float(np.mean(runs))
    assert losses["saliency"] < losses["random"]


def test_lowered_mlps_match_onnx_runtime(trained_simple_net, dead_mlp_path) -> None:
    from graphprune.testing import check_lowering

    check_lowering(graphprune.load_model(trained_simple_net.path))
    check_lowering(graphprune.load_model(dead_mlp_path))
