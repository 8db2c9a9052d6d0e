"""Memory-mapped weights (graphprune.weights): a model with external data is read in place, pruned
with its rewritten weights spilled to scratch files, and saved by file-to-file copies, with the same
result as the same model held in memory."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

import graphprune
from graphprune import runtime, weights
from graphprune.ir import EXTERNAL_ALIGNMENT
from graphprune.models.llama_writer import write_llama

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
    for name in big:  # references to the data file: no bytes copied into the proto
        where = weights.referenced(exported[name])
        assert where is not None and not exported[name].raw_data
        assert where.path == llama.with_name("llama.onnx.data").resolve()
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
