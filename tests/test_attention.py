"""Attention models: heads (GQA: whole KV groups) and FFN neurons of BERT, GPT-2, LLaMA, Qwen2 and
ViT prune into verified models for both exporters, static and dynamic, with the library's default
attention (SDPA: the exported graph merges batch and heads into one axis) as well as eager, and
dead heads and neurons are removed exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import graphprune
from graphprune import api, runtime
from graphprune.models.attention import ATTENTION_BUILDERS, HEADED_BUILDERS
from graphprune.passes.drop_blocks import contributions, find_blocks
from graphprune.testing import check_dead_unit_removal, check_lowering
from graphprune.tools.cli import main

NAMES = sorted(ATTENTION_BUILDERS)
#: (exporter, dynamic axes?) — dynamo with static shapes, dynamo and TorchScript with dynamic ones
VARIANTS = {"dynamo-static": ("dynamo", False), "dynamo-dynamic": ("dynamo", True),
            "torchscript-dynamic": ("torchscript", True)}
#: "default": what transformers picks when the user names none (SDPA); "eager": softmax(QK^T)V
ATTENTIONS = ("default", "eager")
#: units of the prunable groups: heads (KV groups for LLaMA/Qwen2: 2 KV heads of 2 query heads
#: each) and FFN neurons, one of each per layer; the hidden size is a graph output here
EXPECTED_UNITS = {"bert": [4, 4, 128, 128], "gpt2": [4, 4, 128, 128], "llama": [2, 2, 128, 128],
                  "qwen2": [2, 2, 128, 128], "vit": [4, 4, 128, 128]}


@pytest.fixture(scope="session")
def attention_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str, str], Path]:
    folder = tmp_path_factory.mktemp("attention")
    paths = {}
    for name in NAMES:
        for attention in ATTENTIONS:
            for variant, (exporter, dynamic) in VARIANTS.items():
                net = ATTENTION_BUILDERS[name](attention=attention)
                model = graphprune.from_torch(net, net.example_inputs(), input_names=net.input_names,
                                              dynamic_axes=net.dynamic_axes if dynamic else None, exporter=exporter)
                paths[(name, attention, variant)] = graphprune.save_model(
                    model, folder / f"{name}-{attention}-{variant}.onnx")
    return paths


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("name", NAMES)
def test_heads_and_neurons_prune_to_a_verified_model(attention_paths, tmp_path, name: str, attention: str,
                                                     variant: str) -> None:
    path = attention_paths[(name, attention, variant)]
    deps, kept = api.preview(graphprune.load_model(path), ratio=0.5)
    units = sorted(g.units for g in deps.prunable)
    assert units == EXPECTED_UNITS[name]
    assert sorted(g.kind for g in deps.prunable) == ["head", "head", "neuron", "neuron"]
    assert sorted(kept[g.id] for g in deps.prunable) == [u // 2 for u in units]

    out, report_path = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main(["prune", str(path), "-o", str(out), "--ratio", "0.5", "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["verified"] and report["params_after"] < 0.6 * report["params_before"]
    # every attention layer lost heads: the report's head groups show fewer units
    heads = [(g["units_before"], g["units_after"]) for g in report["groups"] if g["kind"] == "head"]
    assert len(heads) == 2 and all(after == before // 2 for before, after in heads), heads
    dense, pruned = graphprune.load_model(path).to_onnx(), graphprune.load_model(out).to_onnx()
    # dynamic exports run at a batch and sequence length other than the traced ones
    feeds = runtime.sample_inputs(dense, dynamic_dim=5)
    assert [o.shape for o in runtime.run(pruned, feeds)] == [o.shape for o in runtime.run(dense, feeds)]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("name", NAMES)
def test_dead_heads_and_neurons_are_removed_exactly(attention_paths, name: str, attention: str, variant: str) -> None:
    model = graphprune.load_model(attention_paths[(name, attention, variant)])
    assert all(g.exact for g in api.inspect(model).prunable)  # so the oracle below covers every group
    heads_seen = []

    def choose(group) -> set[int]:
        """Every other FFN neuron; one head (KV group) in the first layer, two heads in the second
        where there are four, so the layers end up with different head counts."""
        if group.kind != "head":
            return set(range(0, group.units, 2))
        heads_seen.append(group.id)
        return {0, 2} if len(heads_seen) > 1 and group.units == 4 else {1}

    assert check_dead_unit_removal(model, choose) > 0
    assert len(heads_seen) == 2


def test_ort_fuses_as_many_attention_layers_on_a_pruned_bert(attention_paths, tmp_path) -> None:
    """Per-layer literal head counts keep onnxruntime.transformers' Attention fusion working."""
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    dense = attention_paths[("bert", "eager", "torchscript-dynamic")]
    pruned = tmp_path / "p.onnx"
    assert main(["prune", str(dense), "-o", str(pruned), "--ratio", "0.5"]) == 0

    def fuse(path: Path):
        optimized = optimize_model(str(path), model_type="bert", num_heads=4, hidden_size=64, opt_level=0)
        return optimized.get_fused_operator_statistics()["Attention"], optimized.model

    dense_count, _ = fuse(dense)
    pruned_count, fused = fuse(pruned)
    assert dense_count == 2 and pruned_count == dense_count
    proto = graphprune.load_model(pruned).to_onnx()
    feeds = runtime.sample_inputs(proto, dynamic_dim=6)
    feeds["attention_mask"][:] = 1
    feeds["attention_mask"][0, -2:] = 0
    expected, = runtime.run(proto, feeds)
    got, = runtime.run(fused, feeds)
    assert np.max(np.abs(got - expected)) <= 1e-5 * np.max(np.abs(expected))


@pytest.fixture(scope="session")
def headed_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Models with a task head (logits out), dynamic batch and sequence, both exporters."""
    folder = tmp_path_factory.mktemp("headed")
    paths = {}
    for name, build in HEADED_BUILDERS.items():
        for exporter in ("dynamo", "torchscript"):
            net = build()
            model = graphprune.from_torch(net, net.example_inputs(), input_names=net.input_names,
                                          dynamic_axes=net.dynamic_axes, exporter=exporter)
            paths[(name, exporter)] = graphprune.save_model(model, folder / f"{name}-{exporter}.onnx")
    return paths


def _prune_cli(path: Path, tmp_path: Path, *options: str) -> dict:
    out, report_path = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main(["prune", str(path), "-o", str(out), *options, "--report", str(report_path)]) == 0
    dense, pruned = graphprune.load_model(path).to_onnx(), graphprune.load_model(out).to_onnx()
    feeds = runtime.sample_inputs(dense, dynamic_dim=5)
    assert [o.shape for o in runtime.run(pruned, feeds)] == [o.shape for o in runtime.run(dense, feeds)]
    report = json.loads(report_path.read_text())
    assert report["verified"]
    return report


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("name", sorted(HEADED_BUILDERS))
def test_prune_hidden_is_opt_in_and_prunes_the_residual_stream(headed_paths, tmp_path, name: str,
                                                               exporter: str) -> None:
    path = headed_paths[(name, exporter)]
    hidden = [g for g in api.inspect(graphprune.load_model(path)).prunable if g.kind == "hidden"]
    assert len(hidden) == 1 and hidden[0].units == 64  # one residual stream through every layer

    def hidden_after(report: dict) -> int:
        return next(g["units_after"] for g in report["groups"] if g["kind"] == "hidden")

    assert hidden_after(_prune_cli(path, tmp_path, "--ratio", "0.5")) == 64
    report = _prune_cli(path, tmp_path, "--ratio", "0.5", "--prune-hidden")
    assert hidden_after(report) == 32
    # embeddings, every norm and projection lose half their hidden rows or columns
    assert report["params_after"] < 0.35 * report["params_before"]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("name", sorted(HEADED_BUILDERS))
def test_drop_blocks_removes_the_weakest_sub_blocks(headed_paths, tmp_path, name: str, exporter: str) -> None:
    path = headed_paths[(name, exporter)]
    report = _prune_cli(path, tmp_path, "--drop-blocks", "2")
    stats = next(p["stats"] for p in report["passes"] if p["name"] == "drop-blocks")
    assert stats["blocks_found"] == 4 and len(stats["blocks_dropped"]) == 2  # attention + MLP, 2 layers
    model = graphprune.load_model(path)
    model.infer_shapes()
    blocks = find_blocks(model)
    weakest = {blocks[i].name for i in np.argsort(contributions(model, blocks))[:2]}
    assert {b["block"] for b in stats["blocks_dropped"]} == weakest
    assert report["params_after"] < report["params_before"]
    # combined with width pruning
    both = _prune_cli(path, tmp_path, "--drop-blocks", "1", "--ratio", "0.5", "--prune-hidden")
    assert both["params_after"] < report["params_after"]


def test_drop_blocks_refuses_to_drop_every_block(headed_paths, tmp_path, capsys) -> None:
    path = headed_paths[("llama_lm", "dynamo")]
    assert main(["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--drop-blocks", "4"]) != 0
    assert "cannot drop 4 blocks: the model has 4 residual blocks" in capsys.readouterr().err
    assert not (tmp_path / "p.onnx").exists()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript", "default", "default-static", "default-torchscript"])
def test_minilm_heads_and_neurons(minilm_paths, tmp_path, exporter: str) -> None:
    path = minilm_paths[exporter]
    deps, kept = api.preview(graphprune.load_model(path), ratio=0.5)
    assert sorted((g.kind, g.units, kept[g.id]) for g in deps.prunable) == \
        [("head", 12, 6)] * 6 + [("neuron", 1536, 768)] * 6  # the hidden size is the output here
    _prune_cli(path, tmp_path, "--ratio", "0.5")

    def tensor_sizes(file: Path) -> dict[str, int]:
        return {t.name: t.values.size for t in graphprune.load_model(file).weights() if t.values.ndim}

    # 6 layers lose 6 heads (Q, K, V rows and biases, output-projection columns) and 768 neurons each;
    # tensors in both models only: cleanup merges equal scalars (GELU's constants) and, in a static
    # export, folds the position and token-type lookups of the one traced shape into constants
    before, after = tensor_sizes(path), tensor_sizes(tmp_path / "p.onnx")
    removed = sum(before[name] - after[name] for name in before.keys() & after.keys())
    assert removed == 6 * (6 * 32 * (3 * 385 + 384) + 768 * (385 + 384))
    model = graphprune.load_model(path)
    assert check_dead_unit_removal(model, lambda g: {1, 7} if g.kind == "head" else set(range(0, g.units, 3))) > 0


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("name", NAMES)
def test_lowered_module_matches_onnx_runtime(attention_paths, name: str, attention: str, variant: str) -> None:
    check_lowering(graphprune.load_model(attention_paths[(name, attention, variant)]))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_lowered_minilm_matches_onnx_runtime_and_trains_back(minilm_paths, exporter: str) -> None:
    import torch

    from graphprune.torch.lowering import lower, parameter_names, write_back

    model = graphprune.load_model(minilm_paths[exporter])
    check_lowering(model)
    module = lower(model)
    # every weight is a parameter; scalars and Pow exponents are constants of the computation
    exponents = {node.inputs[1].name for node in model.graph.nodes if node.op == "Pow"}
    expected = {w.name for w in model.weights() if w.values.ndim and w.name not in exponents}
    assert expected and set(parameter_names(module).values()) == expected
    # one gradient step on the lowered module lands in the ONNX initializers
    feeds = runtime.sample_inputs(model.to_onnx(), dynamic_dim=4)
    out = module(*[torch.from_numpy(feeds[t.name]) for t in model.graph.inputs])
    out.square().mean().backward()
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    assert write_back(model, module) > 100
    # the ONNX model now computes what the trained module computes
    with torch.no_grad():
        trained = module(*[torch.from_numpy(feeds[t.name]) for t in model.graph.inputs]).numpy()
    assert runtime.max_relative_diff([trained], runtime.run(model.to_onnx(), feeds)) <= 1e-4
    assert runtime.max_relative_diff([trained], [out.detach().numpy()]) > 1e-4  # and it did change


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("name", sorted(HEADED_BUILDERS))
def test_lowered_headed_models_match_onnx_runtime(headed_paths, name: str, exporter: str) -> None:
    check_lowering(graphprune.load_model(headed_paths[(name, exporter)]))


#: models exported at opset 23, where dynamo writes SDPA as the ONNX Attention op (and rotary
#: embeddings as RotaryEmbedding, RMSNorm as RMSNormalization). LLaMA and Qwen2 are exported for
#: batch 1: ONNX Runtime's RotaryEmbedding wants the cos/sin caches' batch to match the input's,
#: and the exporter writes caches of batch 1.
OPSET23 = {"bert": 2, "gpt2": 2, "vit": 2, "llama": 1, "qwen2": 1}


@pytest.fixture(scope="session")
def opset23_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("opset23")
    paths = {}
    for name, batch in OPSET23.items():
        net = ATTENTION_BUILDERS[name](attention="default")
        model = graphprune.from_torch(net, net.example_inputs(batch), input_names=net.input_names, opset=23,
                                      dynamic_axes=net.dynamic_axes if batch > 1 else None)
        paths[name] = graphprune.save_model(model, folder / f"{name}-opset23.onnx")
    return paths


@pytest.mark.parametrize("name", sorted(OPSET23))
def test_onnx_attention_op_heads_prune(opset23_paths, tmp_path, name: str) -> None:
    path = opset23_paths[name]
    model = graphprune.load_model(path)
    assert sum(n.op == "Attention" for n in model.graph.nodes) == 2
    report = _prune_cli(path, tmp_path, "--ratio", "0.5")
    heads = [(g["units_before"], g["units_after"]) for g in report["groups"] if g["kind"] == "head"]
    assert len(heads) == 2 and all(after == before // 2 for before, after in heads), heads
    assert check_dead_unit_removal(graphprune.load_model(path),
                                   lambda g: {g.units - 1} if g.kind == "head" else set(range(0, g.units, 4))) > 0
    check_lowering(graphprune.load_model(path))


@pytest.mark.parametrize(("name", "attention", "variant"), [("llama", "default", "dynamo-dynamic"),
                                                            ("qwen2", "eager", "torchscript-dynamic"),
                                                            ("llama", "default", "dynamo-static")])
def test_gqa_query_heads_keep_every_kv_head(attention_paths, tmp_path, name: str, attention: str,
                                            variant: str) -> None:
    """--gqa query: each of the 2 KV heads keeps 1 of its 2 query heads; K and V projections keep
    every row, Q and the output projection lose half of theirs."""
    path = attention_paths[(name, attention, variant)]
    report = _prune_cli(path, tmp_path, "--ratio", "0.5", "--gqa", "query")
    pruned = [(g["units_before"], g["units_after"]) for g in report["groups"]
              if g["kind"] == "head" and g["units_after"] < g["units_before"]]
    assert pruned == [(2, 1), (2, 1)]  # one group of query heads per layer

    def projections(file: Path) -> list[tuple[int, ...]]:
        return sorted(t.values.shape for t in graphprune.load_model(file).weights() if t.values.ndim == 2)

    before, after = projections(path), projections(tmp_path / "p.onnx")
    # per layer: Q [64, 64] -> [64, 32], K and V [64, 32] stay, O [64, 64] -> [32, 64]
    assert before.count((64, 32)) == 4 and before.count((32, 64)) == 0
    assert after.count((64, 32)) == 4 + 2 and after.count((32, 64)) == 2
    model = graphprune.load_model(path)
    assert check_dead_unit_removal(model, lambda g: {0} if g.kind == "head" else set(), gqa="query") > 0


def test_gqa_query_heads_on_the_onnx_attention_op() -> None:
    """The ONNX Attention op with 4 query heads on 2 KV heads (golden case): --gqa query keeps both
    KV heads and one query head of each, and dead query heads go exactly."""
    from graphprune.testing import model_from_text

    text = (Path(__file__).parent / "golden" / "attention" / "onnx_attention_gqa.onnx.txt").read_text()
    deps = api.inspect(model_from_text(text), gqa="query")
    assert [(g.kind, g.units) for g in deps.prunable] == [("head", 2)]
    model = model_from_text(text)
    report = graphprune.prune(model, ratio=0.5, gqa="query")
    assert report.verified
    shapes = {t.name: t.values.shape for t in model.weights()}
    assert shapes["wq"] == (8, 8) and shapes["wk"] == (8, 8) and shapes["wv"] == (8, 8) and shapes["wo"] == (8, 8)
    # a dead query head in each KV group: 4 columns of wq and 4 rows of wo, 8 wide, twice
    assert check_dead_unit_removal(model_from_text(text), lambda g: {1}, gqa="query") == 2 * 4 * (8 + 8)


def test_an_ort_fused_default_attention_bert_prunes_like_the_unfused_one(attention_paths, tmp_path) -> None:
    """onnxruntime.transformers.optimizer on a default-attention (SDPA) BERT fuses
    SkipLayerNormalization and BiasGelu (com.microsoft); pruning the fused graph cuts the heads and
    neurons of every layer and gives what pruning the unfused graph and then fusing gives."""
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)

    def fuse(path: Path, out: Path) -> Path:
        optimized = optimize_model(str(path), model_type="bert", num_heads=4, hidden_size=64, opt_level=0)
        assert optimized.get_fused_operator_statistics()["SkipLayerNormalization"] == 4
        optimized.save_model_to_file(str(out))
        return out

    dense = attention_paths[("bert", "default", "dynamo-dynamic")]
    fused = fuse(dense, tmp_path / "fused.onnx")
    assert any(n.domain == "com.microsoft" for n in graphprune.load_model(fused).graph.nodes)
    report = _prune_cli(fused, tmp_path, "--ratio", "0.5")
    cut = [(g["kind"], g["units_before"], g["units_after"]) for g in report["groups"] if g["units_after"] is not None
           and g["units_after"] < g["units_before"]]
    assert sorted(cut) == [("head", 4, 2)] * 2 + [("neuron", 128, 64)] * 2
    pruned_fused = tmp_path / "p.onnx"
    unfused = tmp_path / "unfused.onnx"
    assert main(["prune", str(dense), "-o", str(unfused), "--ratio", "0.5"]) == 0
    then_fused = fuse(unfused, tmp_path / "then-fused.onnx")
    proto = graphprune.load_model(dense).to_onnx()
    feeds = runtime.sample_inputs(proto, dynamic_dim=5)
    a, = runtime.run(graphprune.load_model(pruned_fused).to_onnx(), feeds)
    b, = runtime.run(graphprune.load_model(then_fused).to_onnx(), feeds)
    assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(b))
    check_lowering(graphprune.load_model(fused))
    assert check_dead_unit_removal(graphprune.load_model(fused), lambda g: {1} if g.kind == "head" else {0, 5}) > 0
