"""Graphs whose attention ONNX Runtime has already fused into com.microsoft ops prune their heads:
Attention (packed Q|K|V weight) and MultiHeadAttention, as `onnxruntime.transformers.optimizer`
writes them for a BERT (with EmbedLayerNormalization, SkipLayerNormalization, BiasGelu), and
GroupQueryAttention (packed Q|K|V, rotary inside, KV cache) as the onnxruntime-genai model builder
writes it for a LLaMA."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest

import graphprune
from graphprune import api, runtime
from graphprune.cli import main
from graphprune.models.attention import bert
from graphprune.models.genai import LLAMA, genai_export, llama_folder
from graphprune.testing import check_dead_unit_removal, check_lowering

#: the op the optimizer fuses each BERT attention into -> FusionOptions.use_multi_head_attention
FUSED_OPS = {"Attention": False, "MultiHeadAttention": True}


def _fuse(path: Path, out: Path, op: str) -> Path:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    options = FusionOptions("bert")
    options.use_multi_head_attention = FUSED_OPS[op]
    optimized = optimize_model(str(path), model_type="bert", num_heads=4, hidden_size=64, opt_level=0,
                               optimization_options=options)
    stats = optimized.get_fused_operator_statistics()
    assert stats[op] == 2 and stats["EmbedLayerNormalization"] == 1, stats
    optimized.save_model_to_file(str(out))
    return out


@pytest.fixture(scope="session")
def eager_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An eager-attention BERT by TorchScript with dynamic batch and sequence: the export whose
    attention the optimizer's BERT patterns match."""
    net = bert(attention="eager")
    model = graphprune.from_torch(net, net.example_inputs(), input_names=net.input_names,
                                  dynamic_axes=net.dynamic_axes, exporter="torchscript")
    return graphprune.save_model(model, tmp_path_factory.mktemp("fused") / "bert.onnx")


def _feeds(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Batch and sequence of 5 (traced with 2 x 8), the last tokens of one row padded."""
    feeds = runtime.sample_inputs(proto, dynamic_dim=5)
    feeds["attention_mask"][0, -2:] = 0
    return feeds


@pytest.mark.parametrize("op", sorted(FUSED_OPS))
def test_fused_bert_attention_prunes_heads_like_pruning_then_fusing(eager_bert, tmp_path, op: str) -> None:
    fused = _fuse(eager_bert, tmp_path / "fused.onnx", op)
    out, report_path = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main(["prune", str(fused), "-o", str(out), "--ratio", "0.5", "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["verified"]
    cut = sorted((g["kind"], g["units_before"], g["units_after"]) for g in report["groups"]
                 if g["units_after"] is not None and g["units_after"] < g["units_before"])
    assert cut == [("head", 4, 2)] * 2 + [("neuron", 128, 64)] * 2
    pruned = onnx.load(out)
    assert [a.i for n in pruned.graph.node if n.op_type == op for a in n.attribute if a.name == "num_heads"] == [2, 2]
    # the same plan on the unfused graph, fused afterwards, computes the same
    unfused = tmp_path / "unfused.onnx"
    assert main(["prune", str(eager_bert), "-o", str(unfused), "--ratio", "0.5"]) == 0
    then_fused = _fuse(unfused, tmp_path / "then-fused.onnx", op)
    feeds = _feeds(graphprune.load_model(fused).to_onnx())
    dense, = runtime.run(graphprune.load_model(fused).to_onnx(), feeds)
    a, = runtime.run(graphprune.load_model(out).to_onnx(), feeds)
    b, = runtime.run(graphprune.load_model(then_fused).to_onnx(), feeds)
    assert a.shape == b.shape == dense.shape == (5, 5, 64)
    assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(b))


@pytest.mark.parametrize("op", sorted(FUSED_OPS))
def test_fused_bert_lowering_and_dead_heads(eager_bert, tmp_path, op: str) -> None:
    fused = graphprune.load_model(_fuse(eager_bert, tmp_path / "fused.onnx", op))
    check_lowering(fused, feeds=_feeds(fused.to_onnx()))
    # a dead head per layer: 16 Q, K and V columns (+ biases) and 16 output-projection rows of 64;
    # dead neurons 0 and 5: 2 columns + bias of the up and 2 rows of the down projection
    removed = check_dead_unit_removal(graphprune.load_model(tmp_path / "fused.onnx"),
                                      lambda g: {1} if g.kind == "head" else {0, 5})
    assert removed == 2 * (3 * 16 * (64 + 1) + 16 * 64) + 2 * 2 * (64 + 1 + 64)


@pytest.fixture(scope="session")
def genai_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("genai")
    return genai_export(llama_folder(folder / "hf"), folder / "onnx")


def _decode_feeds(proto: onnx.ModelProto, past: int = 3) -> dict[str, np.ndarray]:
    """One generation step of batch 2 after `past` cached tokens."""
    rng = np.random.default_rng(0)
    head = LLAMA["hidden_size"] // LLAMA["num_attention_heads"]
    feeds = {"input_ids": rng.integers(0, LLAMA["vocab_size"], (2, 1)),
             "attention_mask": np.ones((2, past + 1), np.int64)}
    for value in proto.graph.input:
        if value.name.startswith("past_key_values"):
            feeds[value.name] = rng.standard_normal((2, LLAMA["num_key_value_heads"], past, head)).astype(np.float32)
    return feeds


def test_genai_group_query_attention_prunes_query_heads_and_keeps_the_cache(genai_llama, tmp_path) -> None:
    """With `--gqa query` every KV head (and so the cache) stays and half of the query heads of
    each KV head go; whole KV heads are found but their cache is a graph input and output."""
    model = graphprune.load_model(genai_llama)
    assert {n.op for n in model.graph.nodes if n.domain == "com.microsoft"} == {
        "GroupQueryAttention", "SkipSimplifiedLayerNormalization"}
    deps, _ = api.preview(model, ratio=0.5)
    kv_groups = [g for g in deps.groups if g.kind == "head"]
    assert len(kv_groups) == 2 and all("past_key_values" in g.status for g in kv_groups)

    out, report_path = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main(["prune", str(genai_llama), "-o", str(out), "--gqa", "query", "--ratio", "0.5",
                 "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    cut = sorted((g["kind"], g["units_before"], g["units_after"]) for g in report["groups"]
                 if g["units_after"] is not None and g["units_after"] < g["units_before"])
    assert report["verified"] and cut == [("head", 2, 1)] * 2 + [("neuron", 128, 64)] * 2
    pruned = onnx.load(out)
    heads = [{a.name: a.i for a in n.attribute if a.name.endswith("num_heads")}
             for n in pruned.graph.node if n.op_type == "GroupQueryAttention"]
    assert heads == [{"num_heads": 2, "kv_num_heads": 2}] * 2
    dense_proto = graphprune.load_model(genai_llama).to_onnx()
    feeds = _decode_feeds(dense_proto)
    dense, pruned_out = runtime.run(dense_proto, feeds), runtime.run(graphprune.load_model(out).to_onnx(), feeds)
    assert [o.shape for o in pruned_out] == [o.shape for o in dense]  # logits and the cache


def test_genai_group_query_attention_lowering_and_dead_query_heads(genai_llama) -> None:
    model = graphprune.load_model(genai_llama)
    check_lowering(model)  # the prompt: an empty past
    check_lowering(model, feeds=_decode_feeds(model.to_onnx()))
    # one dead query head per KV head: 16 columns of the packed projection and 16 rows of the
    # output projection (64 wide) for each of the 2 KV heads, in both layers
    removed = check_dead_unit_removal(graphprune.load_model(genai_llama),
                                      lambda g: {1} if g.units == 2 else set(), gqa="query")
    assert removed == 2 * 2 * 16 * (64 + 64)
