"""Acceptance: every bad input gives a one-line error, a non-zero exit, no output, an untouched input."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

import graphprune
from graphprune.tools.cli import main


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def run_refused(capsys, model: Path, out: Path, *extra: str, expect: str) -> str:
    """Run `graphprune prune` and check the refusal contract; returns the error line."""
    before = _digest(model.parent) if model.parent.exists() else {}
    code = main(["prune", str(model), "-o", str(out), *extra])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("graphprune: error:")
    assert expect in lines[0], lines[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*")) if out.parent.exists() else True
    if model.parent.exists():
        assert _digest(model.parent) == before
    return lines[0]


@pytest.fixture()
def model_dir(trained_simple_net, tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(trained_simple_net.path, folder / "model.onnx")
    return folder


def test_missing_file(capsys, tmp_path) -> None:
    run_refused(capsys, tmp_path / "nope.onnx", tmp_path / "out.onnx", "--ratio", "0.5", expect="no such file")


def test_empty_file(capsys, tmp_path) -> None:
    (tmp_path / "empty.onnx").write_bytes(b"")
    run_refused(capsys, tmp_path / "empty.onnx", tmp_path / "out.onnx", "--ratio", "0.5", expect="file is empty")


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.5, 0.8, 0.97])
def test_truncated_file(capsys, model_dir, tmp_path, fraction) -> None:
    data = (model_dir / "model.onnx").read_bytes()
    (model_dir / "cut.onnx").write_bytes(data[: int(len(data) * fraction)])
    line = run_refused(capsys, model_dir / "cut.onnx", tmp_path / "out.onnx", "--ratio", "0.5", expect="cut.onnx")
    assert any(word in line for word in ("not a valid ONNX model", "never produced", "reads tensor", "checker"))


@pytest.mark.parametrize("content", [b"\x00\xff" * 300, b"hello, this is not a model\n" * 20,
                                     bytes(range(256)) * 4])
def test_garbage_file(capsys, tmp_path, content) -> None:
    (tmp_path / "garbage.onnx").write_bytes(content)
    run_refused(capsys, tmp_path / "garbage.onnx", tmp_path / "out.onnx", "--ratio", "0.5",
                expect="not a valid ONNX model")


def _external(model_dir: Path) -> Path:
    model = graphprune.load_model(model_dir / "model.onnx")
    path = model_dir / "ext.onnx"
    graphprune.save_model(model, path, external=True)
    assert (model_dir / "ext.onnx.data").exists()
    return path


def test_missing_external_data(capsys, model_dir, tmp_path) -> None:
    path = _external(model_dir)
    (model_dir / "ext.onnx.data").unlink()
    run_refused(capsys, path, tmp_path / "out.onnx", "--ratio", "0.5", expect="is missing")


def test_external_data_shorter_than_declared(capsys, model_dir, tmp_path) -> None:
    path = _external(model_dir)
    data = model_dir / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    run_refused(capsys, path, tmp_path / "out.onnx", "--ratio", "0.5", expect="too short")


def test_external_data_length_other_than_the_shape_needs(capsys, model_dir, tmp_path) -> None:
    path = _external(model_dir)
    proto = onnx.load(str(path), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if onnx.external_data_helper.uses_external_data(t))
    next(e for e in tensor.external_data if e.key == "length").value = "8"
    path.write_bytes(proto.SerializeToString())
    run_refused(capsys, path, tmp_path / "out.onnx", "--ratio", "0.5", expect="but 8 bytes of external data")


@pytest.mark.parametrize("dims", [[10**6, 10**6], [4, 5], [-4, 6]])
def test_initializer_data_that_does_not_fill_its_shape(capsys, tmp_path, dims) -> None:
    """An inline initializer whose dims were edited (absurd, too small, negative) against its data."""
    folder = tmp_path / "in"
    folder.mkdir()
    path = _small_mlp(folder / "m.onnx")
    proto = onnx.load(str(path))
    del proto.graph.initializer[0].dims[:]
    proto.graph.initializer[0].dims.extend(dims)
    onnx.save(proto, str(path))
    run_refused(capsys, path, tmp_path / "o.onnx", "--ratio", "0.5",
                expect=f"initializer 'w1' declares shape {dims}")


def _relocate(path: Path, location: str) -> None:
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(proto.SerializeToString())


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_folder(capsys, model_dir, tmp_path, kind) -> None:
    path = _external(model_dir)
    outside = tmp_path / "outside.data"
    shutil.move(model_dir / "ext.onnx.data", outside)
    if kind == "parent":
        _relocate(path, "../outside.data")
        expect = "outside the model's folder"
    elif kind == "absolute":
        _relocate(path, str(outside))
        expect = "absolute"
    else:
        (model_dir / "link.data").symlink_to(outside)
        _relocate(path, "link.data")
        expect = "outside the model's folder"
    run_refused(capsys, path, tmp_path / "out.onnx", "--ratio", "0.5", expect=expect)


def test_graph_reading_an_undefined_tensor(capsys, model_dir, tmp_path) -> None:
    proto = onnx.load(str(model_dir / "model.onnx"))
    proto.graph.node[1].input[0] = "ghost"
    (model_dir / "bad.onnx").write_bytes(proto.SerializeToString())
    line = run_refused(capsys, model_dir / "bad.onnx", tmp_path / "out.onnx", "--ratio", "0.5", expect="'ghost'")
    assert "no earlier node, initializer or graph input defines" in line


@pytest.mark.parametrize("ratio", ["1", "1.0", "-0.1", "2.5", "nan"])
def test_ratio_outside_range(capsys, model_dir, tmp_path, ratio) -> None:
    run_refused(capsys, model_dir / "model.onnx", tmp_path / "out.onnx", "--ratio", ratio, expect="ratio must be in [0, 1)")


@pytest.mark.parametrize("spelling", [lambda p: p, lambda p: p.parent / "." / p.name])
def test_output_equal_to_input(capsys, model_dir, spelling: Callable[[Path], Path]) -> None:
    model = model_dir / "model.onnx"
    before = model.read_bytes()
    code = main(["prune", str(model), "-o", str(spelling(model)), "--ratio", "0.5"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "is the input file" in lines[0]
    assert model.read_bytes() == before


@pytest.mark.parametrize("args,expect", [
    (["--threshold", "-1"], "threshold must be"),
    (["--round-to", "0", "--ratio", "0.5"], "round_to must be"),
    (["--sparsity", "1.5"], "sparsity must be"),
    ([], "nothing to do"),
    (["--pipeline", "deps,frobnicate"], "unknown pass 'frobnicate'"),
    (["--pipeline", "prune{ratioo=0.5}"], "has no option 'ratioo'"),
    (["--pipeline", "prune{ratio=abc}"], "is not a valid float"),
    (["--pipeline", "deps", "--ratio", "0.5"], "--pipeline replaces --ratio"),
])
def test_bad_options(capsys, model_dir, tmp_path, args, expect) -> None:
    run_refused(capsys, model_dir / "model.onnx", tmp_path / "out.onnx", *args, expect=expect)


def test_console_script_exit_code_and_message(model_dir, tmp_path) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "graphprune.tools.cli", "prune", str(model_dir / "nope.onnx"),
                             "-o", str(tmp_path / "o.onnx"), "--ratio", "0.5"], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_report_path_may_not_be_the_input_or_the_output(capsys, model_dir, tmp_path) -> None:
    run_refused(capsys, model_dir / "model.onnx", tmp_path / "out.onnx", "--ratio", "0.5", "--report",
                str(model_dir / "model.onnx"), expect="report path")
    run_refused(capsys, model_dir / "model.onnx", tmp_path / "out.onnx", "--ratio", "0.5", "--report",
                str(tmp_path / "out.onnx"), expect="is the output model")


def test_output_may_not_overwrite_the_inputs_external_data(capsys, model_dir) -> None:
    path = _external(model_dir)
    before = _digest(model_dir)
    code = main(["prune", str(path), "-o", str(model_dir / "ext.onnx.data"), "--ratio", "0.5"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "external data file" in lines[0]
    assert _digest(model_dir) == before


def test_output_under_a_file(capsys, model_dir) -> None:
    model = model_dir / "model.onnx"
    run_refused(capsys, model, model / "x.onnx", "--ratio", "0.5", expect="is not a folder")


def test_malformed_external_data_entry(capsys, model_dir, tmp_path) -> None:
    path = _external(model_dir)
    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "offset":
            entry.value = "twelve"
    path.write_bytes(proto.SerializeToString())
    run_refused(capsys, path, tmp_path / "out.onnx", "--ratio", "0.5", expect="malformed external data entry")


@pytest.mark.parametrize("args,expect", [
    (["inspect", "{missing}"], "no such file"),
    (["inspect", "{garbage}"], "not a valid ONNX model"),
    (["bench", "{model}", "--runs", "0"], "--runs must be at least 1"),
    (["bench", "{model}", "{garbage}"], "not a valid ONNX model"),
    (["export", "graphprune.models.mlp:train", "-o", "{out}"], "factory 'graphprune.models.mlp:train' raised TypeError"),
    (["export", "no_such_module_xyz:f", "-o", "{out}"], "cannot import module 'no_such_module_xyz'"),
])
def test_other_commands_refuse_bad_input_in_one_line(capsys, model_dir, tmp_path, args, expect) -> None:
    (tmp_path / "garbage.onnx").write_bytes(b"\x00\xff" * 100)
    paths = {"missing": tmp_path / "nope.onnx", "garbage": tmp_path / "garbage.onnx",
             "model": model_dir / "model.onnx", "out": tmp_path / "out.onnx"}
    before = _digest(model_dir)
    code = main([a.format(**{k: str(v) for k, v in paths.items()}) for a in args])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and expect in lines[0], lines
    assert not (tmp_path / "out.onnx").exists() and _digest(model_dir) == before


def _small_mlp(path: Path, opset: int = 17, w1=None) -> Path:
    """x[N, 4] -> MatMul w1 -> Relu -> MatMul w2 -> y[N, 3], written with onnx.helper."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 6)).astype(np.float32) if w1 is None else w1
    w2 = rng.standard_normal((6, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["m"]), helper.make_node("Relu", ["m"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.save(model, str(path))
    return path


def test_opset_older_than_supported_is_refused_with_the_remedy(capsys, tmp_path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    path = _small_mlp(folder / "old.onnx", opset=7)
    run_refused(capsys, path, tmp_path / "o.onnx", "--ratio", "0.5", expect="opset 7; graphprune supports opset 11")
    out = tmp_path / "up.onnx"
    assert main(["prune", str(path), "-o", str(out), "--ratio", "0.5", "--upgrade-opset"]) == 0
    converted = onnx.load(str(out))
    assert [o.version for o in converted.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert graphprune.load_model(out).param_count() == 21  # 6 -> 3 hidden units


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_weights_are_refused(capsys, tmp_path, bad: str) -> None:
    import numpy as np

    w1 = np.ones((4, 6), np.float32)
    w1[1, 2] = np.nan if bad == "nan" else -np.inf
    folder = tmp_path / "in"
    folder.mkdir()
    path = _small_mlp(folder / "w.onnx", w1=w1)
    expect = "holds 1 NaN and 0 infinite" if bad == "nan" else "holds 0 NaN and 1 infinite"
    run_refused(capsys, path, tmp_path / "o.onnx", "--ratio", "0.5", expect=f"initializer 'w1' {expect}")


def test_an_infinite_mask_fill_value_is_accepted(tmp_path) -> None:
    """TorchScript's export of SDPA fills masked scores with a -inf scalar constant: not a weight."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["m"]), helper.make_node("Max", ["m", "fill"], ["f"]),
         helper.make_node("Relu", ["f"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "w1"),
         numpy_helper.from_array(np.array(-np.inf, np.float32), "fill"),
         numpy_helper.from_array(rng.standard_normal((6, 3)).astype(np.float32), "w2")])
    path = tmp_path / "fill.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert main(["prune", str(path), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.5"]) == 0


def test_absurd_input_dims_are_refused_not_allocated(capsys, tmp_path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    path = _small_mlp(folder / "big.onnx")
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 10**12
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 10**12
    onnx.save(model, str(path))
    run_refused(capsys, path, tmp_path / "o.onnx", "--ratio", "0.5", expect="too many to run a check with")


def _control_flow_model(op: str):
    """x -> MatMul w1 -> Relu -> r, then `op` computes r @ w2 inside its subgraph: If (both branches
    read r from the outer scope), Loop (one iteration whose body reads r) or Scan (r is the scanned
    input, w2 read from the outer scope)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    out = helper.make_tensor_value_info
    inputs = [out("x", TensorProto.FLOAT, ["N", 4])]
    if op == "If":
        then = helper.make_graph([helper.make_node("MatMul", ["r", "w2"], ["t"])], "then", [],
                                 [out("t", TensorProto.FLOAT, None)])
        other = helper.make_graph([helper.make_node("Neg", ["r"], ["n"]), helper.make_node("MatMul", ["n", "w2"], ["e"])],
                                  "else", [], [out("e", TensorProto.FLOAT, None)])
        node = helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)
        inputs.append(out("c", TensorProto.BOOL, []))
        y = out("y", TensorProto.FLOAT, ["N", 3])
    elif op == "Loop":
        body = helper.make_graph(
            [helper.make_node("MatMul", ["r", "w2"], ["t"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
            "body", [out("i", TensorProto.INT64, []), out("cond_in", TensorProto.BOOL, [])],
            [out("cond_out", TensorProto.BOOL, []), out("t", TensorProto.FLOAT, None)])
        node = helper.make_node("Loop", ["trips", ""], ["y"], body=body)
        y = out("y", TensorProto.FLOAT, [1, "N", 3])
    else:
        body = helper.make_graph([helper.make_node("MatMul", ["row", "w2"], ["t"])], "body",
                                 [out("row", TensorProto.FLOAT, [6])], [out("t", TensorProto.FLOAT, [3])])
        node = helper.make_node("Scan", ["r"], ["y"], body=body, num_scan_inputs=1)
        y = out("y", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["m"]), helper.make_node("Relu", ["m"], ["r"]), node], "cf",
        inputs, [y],
        [numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.standard_normal((6, 3)).astype(np.float32), "w2"),
         numpy_helper.from_array(np.array(1, np.int64), "trips")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("op", ["If", "Loop", "Scan"])
def test_control_flow_freezes_what_it_reads(tmp_path, op: str) -> None:
    """Control flow whose subgraph reads the hidden activation: that group is frozen with the
    reason, and pruning leaves a verified, unchanged model."""
    path = tmp_path / f"{op}.onnx"
    onnx.save(_control_flow_model(op), str(path))
    deps = graphprune.inspect(graphprune.load_model(path))
    hidden = next(g for g in deps.weight_groups if g.units == 6)
    assert not hidden.prunable and any(op in reason for reason in hidden.frozen), hidden.frozen
    pruned = graphprune.load_model(path)
    report = graphprune.prune(pruned, ratio=0.5)
    assert report.verified and pruned.param_count() == graphprune.load_model(path).param_count()


def _edited_mlp(path: Path, edit: str) -> Path:
    """The small MLP with one defect: a tensor written twice, a cycle, an op of an unknown custom
    domain, or a zero-size weight."""
    import numpy as np
    from onnx import helper, numpy_helper

    _small_mlp(path)
    model = onnx.load(str(path))
    nodes = model.graph.node
    if edit == "duplicate":
        nodes[1].output[0] = "m"  # Relu writes m, which MatMul already wrote
        nodes[2].input[0] = "m"
    elif edit == "cycle":
        add = helper.make_node("Add", ["m", "r"], ["a"])
        nodes[1].input[0] = "a"
        nodes.insert(1, add)
    elif edit == "custom":
        nodes[1].op_type, nodes[1].domain = "FancyAct", "com.example"
        model.opset_import.append(helper.make_opsetid("com.example", 1))
    elif edit == "zero":
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((4, 0), np.float32), "w1"))
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(("edit", "expect"), [
    ("duplicate", "'m' has been used as output names multiple times"),
    ("cycle", "reads tensor 'r', which no earlier node"),
    ("custom", "com.example:FancyAct"),
    ("zero", "Incompatible dimensions"),
])
def test_malformed_graphs_are_refused(capsys, tmp_path, edit: str, expect: str) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    path = _edited_mlp(folder / f"{edit}.onnx", edit)
    run_refused(capsys, path, tmp_path / "o.onnx", "--ratio", "0.5", expect=expect)
