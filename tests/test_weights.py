"""Memory-mapped weights (graphprune.ir.weights): a model with external data is read in place, pruned
with its rewritten weights spilled to scratch files, and saved by file-to-file copies, with the same
result as the same model held in memory."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import graphprune
from graphprune import runtime
from graphprune.errors import GraphpruneError
from graphprune.ir import model as ir
from graphprune.ir import weights
from graphprune.ir.model import EXTERNAL_ALIGNMENT
from graphprune.models.llama_writer import write_llama
from graphprune.testing import model_from_text
from graphprune.testing.fuzz import attention_graphs, conv_graphs, mlp_graphs, prune_options

FEEDS = {"input_ids": np.arange(12, dtype=np.int64).reshape(2, 6) % 7}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Two layers whose projections, embeddings and head (256 KiB and more) are mapped; the norm
    gains (1 KiB) are read into memory."""
    path = tmp_path_factory.mktemp("mapped") / "llama.onnx"
    write_llama(path, layers=2, hidden=256, heads=4, ffn=512, vocab=500)
    return path


def _digests(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.parent.iterdir())}


def _mapped(model) -> set[str]:
    return {name for name, const in model.constants().items() if weights.origin(const.values) is not None}


def test_big_external_initializers_are_mapped_read_only_and_exported_by_reference(llama) -> None:
    model = graphprune.load_model(llama)
    consts = model.constants()
    big = {name for name, const in consts.items() if const.values.nbytes > weights.MAPPED_MIN_BYTES}
    assert len(big) == 2 * 7 + 2 and _mapped(model) == big
    head = consts["lm_head.weight"].values
    assert not head.flags.writeable
    with pytest.raises(ValueError):
        head[0, 0] = 1.0  # a rewrite that broke the never-mutate rule would fail, not edit the input
    proto = model.to_onnx()
    exported = {t.name: t for t in proto.graph.initializer}
    for name in big:  # references to the mapped arrays: no bytes copied into the proto
        assert weights.is_reference(exported[name]) and not exported[name].raw_data
        assert weights.referenced(exported[name]) is consts[name].values
        assert weights.origin(consts[name].values).path == llama.with_name("llama.onnx.data").resolve()
    # and the references run: ORT sees the same weights as onnx.load's in-memory copy
    reference = runtime.run(onnx.load(str(llama)), FEEDS)
    np.testing.assert_array_equal(runtime.run(proto, FEEDS)[0], reference[0])


def test_mapped_model_prunes_exactly_like_the_model_held_in_memory(llama, tmp_path) -> None:
    before = _digests(llama)
    inline_path = tmp_path / "inline.onnx"
    onnx.save(onnx.load(str(llama)), str(inline_path))  # the same weights, inside the model file
    in_memory, mapped = graphprune.load_model(inline_path), graphprune.load_model(llama)
    assert not _mapped(in_memory)
    options = {"ratio": 0.3, "reconstruct": True, "importance": "activation", "sparsity": 0.2}
    for model in (in_memory, mapped):
        assert graphprune.prune(model, **options).verified
    # sparsify rewrote every big weight: each was spilled to a scratch file and mapped from there
    big = {name for name, const in mapped.constants().items() if const.values.nbytes > weights.MAPPED_MIN_BYTES}
    assert len(big) == 16 and _mapped(mapped) == big
    assert all(weights.origin(mapped.constants()[name].values).path.parent.name.startswith("graphprune-weights-")
               for name in big)
    expected = in_memory.constants()
    for name, const in mapped.constants().items():
        np.testing.assert_array_equal(const.values, expected[name].values, err_msg=name)
    saved = graphprune.save_model(mapped, tmp_path / "out" / "pruned.onnx")
    assert saved.with_name("pruned.onnx.data").exists()  # loaded with external data, saved the same way
    np.testing.assert_array_equal(runtime.run(graphprune.load_model(saved).to_onnx(), FEEDS)[0],
                                  runtime.run(in_memory.to_onnx(), FEEDS)[0])
    assert _digests(llama) == before  # the input model and its data file are untouched


def test_saved_external_data_is_page_aligned_and_loads_mapped(llama, tmp_path) -> None:
    saved = graphprune.save_model(graphprune.load_model(llama), tmp_path / "copy.onnx")
    proto = onnx.load(str(saved), load_external_data=False)
    offsets = {t.name: int({e.key: e.value for e in t.external_data}["offset"])
               for t in proto.graph.initializer if onnx.external_data_helper.uses_external_data(t)}
    big = _mapped(graphprune.load_model(saved))
    assert big and all(offsets[name] % EXTERNAL_ALIGNMENT == 0 for name in big)
    original = graphprune.load_model(llama).constants()
    for name, const in graphprune.load_model(saved).constants().items():
        np.testing.assert_array_equal(const.values, original[name].values)


def test_a_proto_outlives_its_model_while_the_files_stay(llama, tmp_path) -> None:
    """`load_model(path).to_onnx()`: the model (and its mappings) may be gone before the proto is
    used; unchanged source files are mapped again. A rewritten weight's scratch file goes with its
    model, and the proto then says so."""
    import gc

    proto = graphprune.load_model(llama).to_onnx()
    gc.collect()
    np.testing.assert_array_equal(runtime.run(proto, FEEDS)[0], runtime.run(onnx.load(str(llama)), FEEDS)[0])
    pruned = graphprune.load_model(llama)
    graphprune.prune(pruned, ratio=0.5)
    proto = pruned.to_onnx()
    del pruned
    gc.collect()
    with pytest.raises(LookupError, match="valid while its model lives"):
        runtime.run(proto, FEEDS)


def test_release_drops_pages_but_not_values(llama) -> None:
    values = graphprune.load_model(llama).constants()["embed_tokens.weight"].values
    copy = np.array(values)
    weights.release(values)
    np.testing.assert_array_equal(values, copy)
    weights.release(copy)  # not mapped: nothing to do


def test_pruning_a_mapped_model_is_deterministic(llama, tmp_path) -> None:
    outputs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / hash_seed / "pruned.onnx"
        subprocess.run([sys.executable, "-m", "graphprune", "-q", "prune", str(llama), "-o", str(out), "--ratio", "0.3"],
                       check=True, env=dict(os.environ, PYTHONHASHSEED=hash_seed), capture_output=True)
        outputs.append((out.read_bytes(), out.with_name("pruned.onnx.data").read_bytes()))
    assert outputs[0] == outputs[1]
    assert len(outputs[0][1]) < llama.with_name("llama.onnx.data").stat().st_size


def test_a_model_loaded_with_external_data_is_saved_with_it(tmp_path) -> None:
    """Even when every tensor is small (nothing mapped), the output keeps the input's form."""
    path = tmp_path / "small.onnx"
    write_llama(path, layers=1, hidden=32, heads=2, ffn=64, vocab=50)
    model = graphprune.load_model(path)
    assert not _mapped(model) and model.external_data
    saved = graphprune.save_model(model.copy(), tmp_path / "out" / "small.onnx")
    assert saved.with_name("small.onnx.data").exists()
    assert graphprune.load_model(saved).external_data


def test_external_data_chosen_for_mapped_weights_keeps_small_tensors_inline(llama, tmp_path) -> None:
    """Saved with external data because its weights are mapped, a model keeps tensors of 1 KiB or
    less in the model file (as onnx does by default); asked for with external=True, all float
    tensors go out."""
    def external_names(path) -> set[str]:
        proto = onnx.load(str(path), load_external_data=False)
        return {t.name for t in proto.graph.initializer if onnx.external_data_helper.uses_external_data(t)}

    chosen = external_names(graphprune.save_model(graphprune.load_model(llama), tmp_path / "chosen.onnx"))
    asked = external_names(graphprune.save_model(graphprune.load_model(llama), tmp_path / "asked.onnx", external=True))
    norm = "layers.0.input_norm.weight"  # 256 floats: 1 KiB
    assert "lm_head.weight" in chosen and norm not in chosen
    assert norm in asked and chosen < asked


def test_mapped_weights_pruned_below_the_mapping_size_become_ordinary_tensors(llama, tmp_path) -> None:
    """Pruned to a tenth, the projections fall under MAPPED_MIN_BYTES and live in memory; they must
    not keep the external-data mark their mapped originals had."""
    model = graphprune.load_model(llama)
    assert graphprune.prune(model, ratio=0.9).verified
    small = [name for name, const in model.constants().items()
             if name.endswith("q_proj.weight") and const.values.nbytes <= weights.MAPPED_MIN_BYTES]
    assert small and not _mapped(model) & set(small)
    saved = graphprune.save_model(model, tmp_path / "tenth.onnx")
    onnx.checker.check_model(str(saved))
    assert runtime.run(graphprune.load_model(saved).to_onnx(), FEEDS)[0].shape == (2, 6, 500)


def test_open_files_do_not_grow_with_mapped_tensors(llama) -> None:
    """Mappings hold no file descriptor: models with thousands of big tensors stay under the
    open-files limit."""
    before = len(os.listdir("/proc/self/fd"))
    model = graphprune.load_model(llama)
    assert len(_mapped(model)) == 16 and len(os.listdir("/proc/self/fd")) <= before


def test_saving_over_the_source_keeps_the_loaded_weights(llama, tmp_path) -> None:
    """The API does not refuse it (the CLI does): the model's mapped bytes are those it loaded, not
    the file that now has the same name."""
    folder = tmp_path / "own"
    folder.mkdir()
    for name in ("llama.onnx", "llama.onnx.data"):
        (folder / name).write_bytes(llama.with_name(name).read_bytes())
    model = graphprune.load_model(folder / "llama.onnx")
    dense = runtime.run(model.to_onnx(), FEEDS)[0]
    graphprune.prune(model, ratio=0.5)
    pruned = runtime.run(model.to_onnx(), FEEDS)[0]
    graphprune.save_model(model, folder / "llama.onnx")  # the data file it was mapped from is replaced
    np.testing.assert_array_equal(runtime.run(model.to_onnx(), FEEDS)[0], pruned)
    np.testing.assert_array_equal(runtime.run(graphprune.load_model(folder / "llama.onnx").to_onnx(), FEEDS)[0], pruned)
    assert not np.array_equal(dense, pruned)


def test_opset_conversion_keeps_weights_mapped(llama) -> None:
    model = graphprune.load_model(llama)
    expected = runtime.run(model.to_onnx(), FEEDS)[0]
    converted = ir.upgrade_opset(model, 18)  # ReduceMean's axes move from attribute to input
    assert converted.graph.opset == 18 and _mapped(converted) == _mapped(model)
    np.testing.assert_allclose(runtime.run(converted.to_onnx(), FEEDS)[0], expected, rtol=1e-5, atol=1e-5)


def test_weights_read_only_inside_control_flow_stay_correct(tmp_path) -> None:
    """A big external weight that only an If branch reads (the main graph's tensors do not list
    it): mapped at load, exported with its bytes inside the subgraph, pruned around, saved. And one
    read by the main graph and a branch: a reference in both places, left out of skeletons."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    out = helper.make_tensor_value_info
    branch = helper.make_graph([helper.make_node("MatMul", ["r", "w2"], ["t"])], "then", [],
                               [out("t", TensorProto.FLOAT, None)])
    # w1 is also read inside the else branch, so onnx-graphsurgeon copies it into that subgraph
    other = helper.make_graph([helper.make_node("MatMul", ["x", "w1"], ["xw"]), helper.make_node("Sub", ["r", "xw"], ["e"])],
                              "else", [], [out("e", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["m"]), helper.make_node("Relu", ["m"], ["r"]),
         helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)], "cf",
        [out("x", TensorProto.FLOAT, ["N", 64]), out("c", TensorProto.BOOL, [])], [out("y", TensorProto.FLOAT, ["N", 300])],
        [numpy_helper.from_array(rng.standard_normal((64, 300)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.standard_normal((300, 300)).astype(np.float32), "w2")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path = tmp_path / "if.onnx"
    onnx.save(proto, str(path), save_as_external_data=True, location="if.onnx.data", size_threshold=0)
    cases = [{"x": np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64), "c": np.array(c)} for c in (True, False)]
    expected = [runtime.run(onnx.load(str(path)), feeds)[0] for feeds in cases]
    model = graphprune.load_model(path)
    assert {"w1", "w2"} <= {c.name for c in ir._constants_everywhere(model.graph) if weights.origin(c.values)}
    assert graphprune.prune(model, ratio=0.5).verified
    saved = graphprune.load_model(graphprune.save_model(model, tmp_path / "out" / "if.onnx"))
    for feeds, values in zip(cases, expected, strict=True):
        np.testing.assert_array_equal(runtime.run(model.to_onnx(), feeds)[0], values)
        np.testing.assert_array_equal(runtime.run(saved.to_onnx(), feeds)[0], values)


@settings(max_examples=30, deadline=None)
@given(family=st.sampled_from(["mlp", "conv", "attention"]), data=st.data(), options=prune_options())
def test_fuzzed_graphs_prune_the_same_memory_mapped_as_in_memory(family: str, data, options: dict) -> None:
    """Differential fuzzing of the mapped path: with every float weight mapped (the size bound at
    zero), random graphs prune to the same verdict and weights as their in-memory twins."""
    text = data.draw({"mlp": mlp_graphs, "conv": conv_graphs, "attention": attention_graphs}[family]())
    with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory() as folder:
        patch.setattr(weights, "MAPPED_MIN_BYTES", 0)  # also the bound of what skeletons leave out
        path = graphprune.save_model(model_from_text(text), Path(folder) / "m.onnx", external=True)
        in_memory, mapped = model_from_text(text), graphprune.load_model(path)
        floats = {name for name, const in mapped.constants().items() if const.values.dtype.kind == "f"}
        assert floats and _mapped(mapped) == floats
        verdicts = []
        for model in (in_memory, mapped):
            try:
                verdicts.append(graphprune.prune(model, seed=0, **options).verified)
            except GraphpruneError as exc:
                verdicts.append(str(exc))
        assert verdicts[0] == verdicts[1]
        expected = in_memory.constants()
        assert set(expected) == set(mapped.constants())
        for name, const in mapped.constants().items():
            np.testing.assert_array_equal(const.values, expected[name].values, err_msg=name)
