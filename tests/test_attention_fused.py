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
from graphprune.models.attention import bert
from graphprune.models.genai import LLAMA
from graphprune.testing import check_dead_unit_removal, check_lowering, kill_units
from graphprune.tools.cli import main
from graphprune.tools.generate import greedy

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


def _cut(report: dict) -> list[tuple[str, int, int]]:
    return sorted((g["kind"], g["units_before"], g["units_after"]) for g in report["groups"]
                  if g["units_after"] is not None and g["units_after"] < g["units_before"])


def _cache_shapes(proto: onnx.ModelProto) -> dict[str, list]:
    return {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in [*proto.graph.input, *proto.graph.output] if "key" in v.name or "value" in v.name}


def _head_attributes(proto: onnx.ModelProto) -> list[dict[str, int]]:
    return [{a.name: a.i for a in n.attribute if a.name.endswith("num_heads")}
            for n in proto.graph.node if n.op_type == "GroupQueryAttention"]


def test_genai_group_query_attention_prunes_kv_heads_and_resizes_the_cache(genai_llama, tmp_path) -> None:
    """Whole KV heads (each with its 2 query heads) go, and the cache inputs and outputs of every
    layer lose them: the KV cache is state, not a frozen interface."""
    model = graphprune.load_model(genai_llama)
    assert {n.op for n in model.graph.nodes if n.domain == "com.microsoft"} == {
        "GroupQueryAttention", "SkipSimplifiedLayerNormalization"}
    out, report_path = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main(["prune", str(genai_llama), "-o", str(out), "--ratio", "0.5", "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["verified"] and _cut(report) == [("head", 2, 1)] * 2 + [("neuron", 128, 64)] * 2
    pruned = onnx.load(out)
    assert _head_attributes(pruned) == [{"num_heads": 2, "kv_num_heads": 1}] * 2
    shapes = _cache_shapes(pruned)
    assert len(shapes) == 8 and all(dims[1] == 1 for dims in shapes.values())
    assert sorted(report["state"]) == sorted(shapes)
    # a generation step after 3 cached tokens, the cache cut to the KV heads kept
    dense_proto = graphprune.load_model(genai_llama).to_onnx()
    feeds = _decode_feeds(dense_proto)
    for name, axes in report["state"].items():
        if name in feeds:
            feeds[name] = np.take(feeds[name], axes["1"], axis=1)
    outputs = runtime.run(graphprune.load_model(out).to_onnx(), feeds)
    assert outputs[0].shape == (2, 1, LLAMA["vocab_size"]) and all(o.shape == (2, 1, 4, 16) for o in outputs[1:])


def test_genai_group_query_attention_prunes_query_heads_and_keeps_the_cache(genai_llama, tmp_path) -> None:
    """With `--gqa query` every KV head (and so the cache) stays and half of the query heads of
    each KV head go."""
    out, report_path = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main(["prune", str(genai_llama), "-o", str(out), "--gqa", "query", "--ratio", "0.5",
                 "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["verified"] and _cut(report) == [("head", 2, 1)] * 2 + [("neuron", 128, 64)] * 2
    pruned = onnx.load(out)
    assert _head_attributes(pruned) == [{"num_heads": 2, "kv_num_heads": 2}] * 2
    assert _cache_shapes(pruned) == _cache_shapes(onnx.load(genai_llama)) and not report["state"]
    dense_proto = graphprune.load_model(genai_llama).to_onnx()
    feeds = _decode_feeds(dense_proto)
    dense, pruned_out = runtime.run(dense_proto, feeds), runtime.run(graphprune.load_model(out).to_onnx(), feeds)
    assert [o.shape for o in pruned_out] == [o.shape for o in dense]  # logits and the cache


@pytest.mark.parametrize("gqa", ["kv", "query"])
def test_dead_heads_pruned_from_a_cache_model_generate_the_same_tokens(genai_llama, gqa: str) -> None:
    """A KV head (kv) or a query head of each KV head (query) zeroed in layer 0: `--threshold 0`
    removes it, and greedy generation gives the dense model's tokens and logits."""
    model = graphprune.load_model(genai_llama)
    model.infer_shapes()
    kill_units(model, lambda g: {1} if g.kind == "head" and g.id == min(
        h.id for h in api.inspect(model, gqa).prunable if h.kind == "head") else set(), gqa)
    dense = model.copy()
    report = api.prune(model, ratio=None, threshold=0.0, gqa=gqa)
    assert report.verified and report.params_after < report.params_before
    assert bool(report.state) == (gqa == "kv")
    prompt = np.random.default_rng(3).integers(3, LLAMA["vocab_size"], (2, 5))
    tokens, logits = greedy(dense, prompt, 24)
    pruned_tokens, pruned_logits = greedy(model, prompt, 24)
    assert np.array_equal(tokens, pruned_tokens)
    assert runtime.max_relative_diff(logits, pruned_logits) <= 1e-4


def test_genai_group_query_attention_lowering_and_dead_query_heads(genai_llama) -> None:
    model = graphprune.load_model(genai_llama)
    check_lowering(model)  # the prompt: an empty past
    check_lowering(model, feeds=_decode_feeds(model.to_onnx()))
    # one dead query head per KV head: 16 columns of the packed projection and 16 rows of the
    # output projection (64 wide) for each of the 2 KV heads, in both layers
    removed = check_dead_unit_removal(graphprune.load_model(genai_llama),
                                      lambda g: {1} if g.units == 2 else set(), gqa="query")
    assert removed == 2 * 2 * 16 * (64 + 64)


def _genai_tokens(folder: Path, prompt: np.ndarray, length: int) -> np.ndarray:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return np.asarray(generator.get_sequence(0))


def test_a_pruned_genai_folder_generates_in_onnxruntime_genai(genai_llama, tmp_path) -> None:
    """prune --config genai_config.json writes the KV-head and query-head counts the pruned graph
    has; onnxruntime-genai loads the folder and greedily generates what `greedy` generates."""
    import shutil

    source = genai_llama.parent
    out = tmp_path / "pruned"
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, out / name)
    assert main(["prune", str(genai_llama), "-o", str(out / "model.onnx"), "--ratio", "0.5",
                 "--config", str(source / "genai_config.json")]) == 0
    decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["head_size"]) == (2, 1, 16)
    prompt = np.array([[5, 6, 7, 8, 9]])
    tokens = _genai_tokens(out, prompt, 20)
    ours, _ = greedy(graphprune.load_model(out / "model.onnx"), prompt, 15)
    assert np.array_equal(tokens, np.concatenate([prompt[0], ours[0]]))
    # a Hugging Face config.json gets the same counts, head_dim kept explicit
    hf = tmp_path / "hf"
    hf.mkdir()
    assert main(["prune", str(genai_llama), "-o", str(hf / "model.onnx"), "--ratio", "0.5",
                 "--config", str(source.parent / "hf" / "config.json")]) == 0
    config = json.loads((hf / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"],
            config["head_dim"]) == (2, 1, 64, 16)


def test_a_config_cannot_describe_layers_with_different_counts(genai_llama, tmp_path, capsys) -> None:
    """Global allocation leaves the layers different FFN widths, which config.json cannot hold."""
    out = tmp_path / "model.onnx"
    assert main(["prune", str(genai_llama), "-o", str(out), "--ratio", "0.5", "--allocation", "global",
                 "--config", str(genai_llama.parent.parent / "hf" / "config.json")]) == 1
    assert "layers keep different FFN widths" in capsys.readouterr().err and not out.exists()


def test_generate_command(genai_llama, eager_bert, capsys) -> None:
    assert main(["generate", str(genai_llama), "--ids", "5,6,7,8,9", "--tokens", "15"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    expected, _ = greedy(graphprune.load_model(genai_llama), np.array([[5, 6, 7, 8, 9]]), 15)
    assert printed == ",".join(map(str, expected[0]))
    assert main(["generate", str(eager_bert), "--ids", "5", "--tokens", "2"]) == 1
    assert "no KV cache" in capsys.readouterr().err


def test_uniform_heads_give_every_layer_one_head_count_under_global_allocation(genai_llama, tmp_path) -> None:
    out = tmp_path / "model.onnx"
    assert main(["prune", str(genai_llama), "-o", str(out), "--ratio", "0.5", "--allocation", "global",
                 "--uniform-heads", "--config", str(genai_llama.parent / "genai_config.json")]) == 0
    heads = _head_attributes(onnx.load(out))
    assert len({tuple(h.items()) for h in heads}) == 1 and heads[0]["kv_num_heads"] == 1
    decoder = json.loads((tmp_path / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["num_key_value_heads"] == 1 and decoder["num_attention_heads"] == 2
