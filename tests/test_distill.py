"""Knowledge distillation: the lowered student learns the teacher's outputs, and the CLI writes a
verified model, a loss curve and a report without touching its inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import graphprune
from graphprune import runtime
from graphprune.calib import random_calibration
from graphprune.models.attention import ATTENTION_BUILDERS
from graphprune.tools.cli import main
from graphprune.torch.distill import DistillError, DistillOptions, distill, hidden_states


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _output_error(student, teacher, feeds) -> float:
    ours, theirs = runtime.run(student.to_onnx(), feeds)[0], runtime.run(teacher.to_onnx(), feeds)[0]
    return float(np.mean(np.square(ours - theirs)) / np.mean(np.square(theirs)))


@pytest.fixture(scope="module")
def pruned_simple_net(trained_simple_net, tmp_path_factory):
    folder = tmp_path_factory.mktemp("distill")
    model = graphprune.load_model(trained_simple_net.path)
    graphprune.prune(model, ratio=0.5)
    student = graphprune.save_model(model, folder / "student.onnx")
    data = folder / "data.npz"
    np.savez(data, x=trained_simple_net.x.numpy())
    return student, trained_simple_net.path, data


def test_distillation_pulls_the_student_towards_the_teacher(pruned_simple_net) -> None:
    student_path, teacher_path, data = pruned_simple_net
    student, teacher = graphprune.load_model(student_path), graphprune.load_model(teacher_path)
    feeds = {"x": np.load(data)["x"]}
    before = _output_error(student, teacher, feeds)
    # one batch of all samples: the trainer's normalized loss is then exactly `_output_error`
    result = distill(student, teacher, feeds, DistillOptions(epochs=100, lr=3e-3, batch=len(feeds["x"])))
    after = _output_error(student, teacher, feeds)
    assert result.parameters_changed == sum(1 for _ in student.weights())
    assert len(result.steps) == 100
    # the ONNX model computes what was trained: its own error agrees with the loss the trainer saw
    assert after == pytest.approx(result.loss_after, rel=1e-3)
    assert result.loss_before == pytest.approx(before, rel=1e-3)
    assert after < 0.5 * before


def test_hidden_states_match_the_residual_stream_of_a_pruned_transformer() -> None:
    net = ATTENTION_BUILDERS["bert"]()
    dense = graphprune.from_torch(net, net.example_inputs(), input_names=net.input_names,
                                  dynamic_axes=net.dynamic_axes)
    student = dense.copy()
    graphprune.prune(student, ratio=0.5)
    names = hidden_states(student, dense)
    norms = [n.outputs[0].name for n in student.graph.nodes if n.op == "LayerNormalization"]
    assert set(norms) - {t.name for t in student.graph.outputs} <= set(names)
    assert len(names) >= 4
    feeds = random_calibration(dense.to_onnx(), samples=8, dynamic_dim=6)
    feeds["attention_mask"][:, 4:] = 0  # padding: left out of the loss and cut from the batches
    result = distill(student, dense, feeds, DistillOptions(epochs=1, lr=1e-3, batch=4, hidden=True))
    assert result.hidden == names and len(result.steps) == 2 and np.all(np.isfinite(result.steps))


def test_a_memory_mapped_llama_distills_with_finite_losses(tmp_path) -> None:
    """RMSNorm squares with Pow(x, 2): the exponent is a constant, not a trained weight (its gradient
    x^2 log x is NaN for negative x). Trained weights of a mapped student stay mapped."""
    from graphprune.ir import weights
    from graphprune.models.llama_writer import write_llama

    path = tmp_path / "llama.onnx"
    write_llama(path, layers=1, hidden=256, heads=4, ffn=512, vocab=300)
    teacher, student = graphprune.load_model(path), graphprune.load_model(path)
    graphprune.prune(student, ratio=0.5)
    feeds = random_calibration(teacher.to_onnx(), samples=8, dynamic_dim=6)
    result = distill(student, teacher, feeds, DistillOptions(epochs=2, lr=1e-3, batch=4))
    assert len(result.steps) == 4 and np.all(np.isfinite(result.steps)) and result.loss_after < result.loss_before
    trained = weights.origin(student.constants()["lm_head.weight"].values)
    assert trained is not None and trained.path.parent.name.startswith("graphprune-weights-")


def test_mismatched_student_and_teacher_are_refused(pruned_simple_net) -> None:
    student_path, _, _ = pruned_simple_net
    net = ATTENTION_BUILDERS["bert"]()
    other = graphprune.from_torch(net, net.example_inputs(), input_names=net.input_names)
    student = graphprune.load_model(student_path)
    with pytest.raises(DistillError, match="different inputs"):
        distill(student, other, {"x": np.zeros((4, 10), np.float32)})


def test_cli_distill_writes_a_verified_model_a_plot_and_a_report(pruned_simple_net, tmp_path, capsys) -> None:
    student, teacher, data = pruned_simple_net
    digests = {p: _digest(p) for p in (student, teacher, data)}
    out, report = tmp_path / "trained.onnx", tmp_path / "distill.json"
    code = main(["distill", str(student), "--teacher", str(teacher), "--data", str(data), "-o", str(out),
                 "--epochs", "5", "--lr", "3e-3", "--report", str(report)])
    assert code == 0, capsys.readouterr()
    assert "verified" in capsys.readouterr().out
    assert {p: _digest(p) for p in digests} == digests
    plot = tmp_path / "trained.loss.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stats = json.loads(report.read_text())
    assert stats["loss_after"] < stats["loss_before"] and stats["plot"] == str(plot)
    feeds = {"x": np.load(data)["x"]}
    teacher_model = graphprune.load_model(teacher)
    assert _output_error(graphprune.load_model(out), teacher_model, feeds) < _output_error(
        graphprune.load_model(student), teacher_model, feeds)


@pytest.mark.parametrize(("args", "message"), [
    (["--epochs", "0"], "--epochs >= 1"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--data", "missing.npz"], "does not exist"),
])
def test_cli_distill_errors_are_one_line(pruned_simple_net, tmp_path, capsys, args, message) -> None:
    student, teacher, data = pruned_simple_net
    base = ["distill", str(student), "--teacher", str(teacher), "-o", str(tmp_path / "o.onnx")]
    if "--data" not in args:
        base += ["--data", str(data)]
    assert main(base + args) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_cli_distill_refuses_to_overwrite_the_teacher(pruned_simple_net, capsys) -> None:
    student, teacher, data = pruned_simple_net
    before = _digest(teacher)
    assert main(["distill", str(student), "--teacher", str(teacher), "--data", str(data), "-o", str(teacher)]) == 1
    assert "is the input file" in capsys.readouterr().err
    assert _digest(teacher) == before
