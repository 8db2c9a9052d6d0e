"""Causal language models: a pruned model is never bigger than its input (tied embeddings stay
tied)."""

from __future__ import annotations

import json

import onnx_graphsurgeon as gs

import graphprune
from graphprune.models.attention import llama_lm
from graphprune.tools.cli import main


def test_a_tied_lm_head_stays_tied_and_the_pruned_model_is_smaller(tmp_path) -> None:
    """The dynamo exporter keeps a large tied LM head as Transpose(embedding); folding it would
    add a second 2 MiB table to a pruned model."""
    net = llama_lm(vocab=8192)
    model = graphprune.from_torch(net, net.example_inputs(), input_names=net.input_names,
                                  dynamic_axes=net.dynamic_axes, exporter="dynamo")
    dense = graphprune.save_model(model, tmp_path / "lm.onnx")
    table = next(n.inputs[0] for n in model.graph.nodes if n.op == "Transpose"
                 and isinstance(n.inputs[0], gs.Constant))
    assert table.values.shape == (8192, 64)
    out, report_path = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main(["prune", str(dense), "-o", str(out), "--ratio", "0.2", "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["verified"] and report["params_after"] < report["params_before"]
    assert out.stat().st_size < dense.stat().st_size
    pruned = graphprune.load_model(out)
    tables = [t for t in pruned.weights() if t.values.size == 8192 * 64]
    assert len(tables) == 1 and any(n.op == "Transpose" for n in tables[0].outputs)


def _scored_kind(report_path) -> str:
    report = json.loads(report_path.read_text())
    return next(p["stats"]["kind"] for p in report["passes"] if p["name"] == "score-importance")


def test_magnitude_on_a_language_model_warns_and_calibration_data_picks_a_calibrated_criterion(
        tmp_path, caplog) -> None:
    import numpy as np

    net = llama_lm()
    model = graphprune.from_torch(net, net.example_inputs(), input_names=net.input_names,
                                  dynamic_axes=net.dynamic_axes, exporter="dynamo")
    dense = graphprune.save_model(model, tmp_path / "lm.onnx")
    report_path = tmp_path / "r.json"
    assert main(["prune", str(dense), "-o", str(tmp_path / "a.onnx"), "--ratio", "0.2", "--report", str(report_path)]) == 0
    assert "magnitude importance on a language model" in caplog.text
    caplog.clear()
    assert _scored_kind(report_path) == "l2"
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=np.random.default_rng(0).integers(0, 100, (8, 8)), attention_mask=np.ones((8, 8), np.int64))
    assert main(["prune", str(dense), "-o", str(tmp_path / "b.onnx"), "--ratio", "0.2", "--calib", str(calib),
                 "--report", str(report_path)]) == 0
    assert "magnitude importance" not in caplog.text
    assert _scored_kind(report_path) == "activation"


def _torch_perplexity(hf_folder, windows) -> float:
    """exp(mean cross-entropy of every next token within each window) by transformers."""
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(hf_folder).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(windows)).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             torch.from_numpy(windows[:, 1:]).reshape(-1))
    return float(torch.exp(loss))


def test_perplexity_of_cache_and_plain_exports_equals_the_torch_models(genai_llama, tmp_path) -> None:
    """`graphprune eval` on the builder's KV-cache graph and on a dynamo export without a cache
    gives the perplexity transformers computes for the same windows."""
    import numpy as np
    import torch

    from graphprune.tools.perplexity import perplexity, text_windows

    hf = genai_llama.parent.parent / "hf"
    text = " ".join(f"w{i}" for i in np.random.default_rng(0).integers(3, 100, 700))
    (tmp_path / "text.txt").write_text(text)
    from graphprune.calib import load_tokenizer

    windows = text_windows(text, load_tokenizer(str(hf)), 64)
    assert windows.shape == (10, 64)
    expected = _torch_perplexity(hf, windows)

    cached = perplexity(graphprune.load_model(genai_llama), windows)
    assert cached.tokens == 10 * 63 and abs(cached.perplexity - expected) <= 1e-4 * expected

    import transformers

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = transformers.LlamaForCausalLM.from_pretrained(hf).eval()

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    example = (torch.from_numpy(windows[:2]), torch.ones(2, 64, dtype=torch.int64))
    plain = graphprune.save_model(graphprune.from_torch(Logits(), example, input_names=["input_ids", "attention_mask"],
                                                        dynamic_axes=(0, 1)), tmp_path / "plain.onnx")
    report = tmp_path / "ppl.json"
    assert main(["eval", str(plain), "--text", str(tmp_path / "text.txt"), "--tokenizer", str(hf), "--window", "64",
                 "--report", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["tokens"] == 630 and abs(result["perplexity"] - expected) <= 1e-4 * expected


def test_causal_calibration_windows_drive_calibrated_pruning_of_a_cache_model(genai_llama, tmp_path) -> None:
    """`calib --causal` cuts text into unpadded windows with empty KV caches; obs + reconstruct
    prune KV heads of the cache model (its refit feeds lose the heads too), and `eval` scores it."""
    import numpy as np

    hf = genai_llama.parent.parent / "hf"
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i}" for i in np.random.default_rng(1).integers(3, 100, 2000)))
    calib = tmp_path / "calib.npz"
    assert main(["calib", str(text), "--model", str(genai_llama), "--tokenizer", str(hf), "--causal", "--seq", "32",
                 "-o", str(calib)]) == 0
    with np.load(calib) as data:
        assert data["input_ids"].shape == (62, 32) and data["attention_mask"].min() == 1
        assert data["past_key_values.0.key"].shape == (62, 2, 0, 16)
    # uniform allocation: one sequential pass (prune-sequential); global: score, prune, then reconstruct
    for allocation, refit_pass in (("uniform", "prune-sequential"), ("global", "reconstruct")):
        out, report_path = tmp_path / "p.onnx", tmp_path / "r.json"
        assert main(["prune", str(genai_llama), "-o", str(out), "--ratio", "0.5", "--calib", str(calib),
                     "--importance", "obs", "--reconstruct", "--allocation", allocation,
                     "--report", str(report_path)]) == 0
        report = json.loads(report_path.read_text())
        assert report["verified"] and report["state"]
        refit = next(p["stats"] for p in report["passes"] if p["name"] == refit_pass)
        assert refit["layers_refit"] == 4
        assert all(a < b for a, b in zip(refit["relative_error_after"], refit["relative_error_before"], strict=True))
    ppl = tmp_path / "ppl.json"
    assert main(["eval", str(out), "--data", str(calib), "--windows", "8", "--report", str(ppl)]) == 0
    result = json.loads(ppl.read_text())
    assert result["windows"] == 8 and result["tokens"] == 8 * 31 and np.isfinite(result["perplexity"])


def test_flap_scores_a_constant_unit_zero_where_wanda_sp_scores_it_high() -> None:
    """A unit whose activation never changes (it reads only a constant input feature) loses
    nothing a bias could not give back: FLAP's fluctuation scores it 0, Wanda-sp by its norm."""
    import numpy as np

    from graphprune import api
    from graphprune.testing import model_from_text

    model = model_from_text("""
# weights: w1 w2
<ir_version: 10, opset_import: ["" : 20]>
two (float[N, 4] x, float[4, 6] w1, float[6, 3] w2) => (float[N, 3] y)
{
  a = MatMul (x, w1)
  y = MatMul (a, w2)
}""")
    consts = model.constants()
    w1 = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    w1[:, 0] = [0, 0, 0, 1]  # unit 0 reads the constant feature only
    w1[3, 1:] = 0
    consts["w1"].values = w1
    x = np.random.default_rng(1).standard_normal((64, 4)).astype(np.float32)
    x[:, 3] = 5.0
    scores = {}
    for kind in ("flap", "wanda-sp", "activation"):
        work = model.copy()
        report = api.prune(work, ratio=1 / 6, importance=kind, calibration={"x": x}, round_to=1)
        scores[kind] = next(g["scores"] for g in report.groups if g["units_before"] == 6)
    assert scores["flap"][0] < 1e-6 * max(scores["flap"]) and np.argmin(scores["flap"]) == 0
    assert scores["wanda-sp"] == scores["activation"] and np.argmin(scores["activation"]) != 0


def test_top_k_kl_is_the_kl_over_the_teachers_top_classes() -> None:
    import torch

    from graphprune.torch.distill import _kl

    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 50, generator=generator), torch.randn(6, 50, generator=generator) * 3
    full = _kl(student, teacher, None, 2.0)
    assert torch.isclose(_kl(student, teacher, None, 2.0, top_k=50), full)
    top = _kl(student, teacher, None, 2.0, top_k=5)
    p_full, q_full = torch.softmax(teacher / 2, -1), torch.softmax(student / 2, -1)
    p, classes = p_full.topk(5, dim=-1)
    q = q_full.gather(-1, classes)
    p, q = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1), torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean() * 4  # the top 5 and one bucket for the rest
    assert torch.isclose(top, expected, rtol=1e-4)
    assert 0 < top < full
    assert _kl(teacher, teacher, None, 2.0, top_k=5) < 1e-6 * full  # a perfect student: no loss


def test_text_distillation_with_top_k_kl_brings_a_pruned_cache_model_closer_to_its_teacher(genai_llama) -> None:
    """Next-token KL (teacher's top 8 of 100 tokens) on causal windows: a pruned KV-cache decoder,
    lowered to torch and trained, ends nearer the dense model, and still verifies."""
    import numpy as np

    import graphprune
    from graphprune import runtime
    from graphprune.tools.perplexity import causal_feeds
    from graphprune.torch.distill import DistillOptions, distill, verify_student

    teacher = graphprune.load_model(genai_llama)
    # random weights predict nearly uniform tokens; a sharper LM head gives the KL something to fit
    logits = next(t for t in teacher.graph.outputs if t.name == "logits")
    head = next(t for t in logits.inputs[0].inputs if hasattr(t, "values"))
    head.values = np.asarray(head.values) * 20
    student = teacher.copy()
    graphprune.prune(student, ratio=0.5)
    ids = np.random.default_rng(4).integers(3, 100, (24, 16))
    feeds = causal_feeds(teacher, ids, runtime.implied_dims(teacher.to_onnx()))
    result = distill(student, teacher, feeds, DistillOptions(epochs=4, lr=1e-3, batch=8, loss="kl", top_k=8))
    assert result.loss_after < 0.8 * result.loss_before
    assert verify_student(student, teacher, feeds).output_shapes


def test_prune_and_sweep_report_perplexity_on_held_out_windows(genai_llama, tmp_path) -> None:
    """`--eval-data` (token windows of held-out text): `prune` reports the perplexity before and
    after, `sweep` one per model; each equals what `graphprune eval` says of that model."""
    import numpy as np

    calib, held_out = tmp_path / "calib.npz", tmp_path / "held_out.npz"
    for path, seed in ((calib, 1), (held_out, 2)):
        ids = np.random.default_rng(seed).integers(3, 100, (8, 24))
        np.savez(path, input_ids=ids)

    def evaluated(model_path) -> float:
        report = tmp_path / "ppl.json"
        assert main(["eval", str(model_path), "--data", str(held_out), "--report", str(report)]) == 0
        return json.loads(report.read_text())["perplexity"]

    out, report_path = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main(["prune", str(genai_llama), "-o", str(out), "--ratio", "0.5", "--eval-data", str(held_out),
                 "--report", str(report_path)]) == 0
    reported = json.loads(report_path.read_text())["perplexity"]
    assert reported["windows"] == 8 and reported["window"] == 24
    assert abs(reported["dense"] - evaluated(genai_llama)) <= 1e-3 and abs(reported["pruned"] - evaluated(out)) <= 1e-3
    assert reported["pruned"] != reported["dense"]
    sweep_dir = tmp_path / "sweep"
    assert main(["sweep", str(genai_llama), "--ratios", "0.5", "--out", str(sweep_dir), "--eval-data", str(held_out),
                 "--runs", "2", "--repeats", "1", "--seq", "8"]) == 0
    points = json.loads((sweep_dir / "sweep.json").read_text())
    assert abs(points[0]["perplexity"] - reported["dense"]) <= 1e-3
    assert abs(points[1]["perplexity"] - evaluated(sweep_dir / "ratio-50.onnx")) <= 1e-3


def test_decode_rate_times_the_cached_steps_of_greedy_generation(genai_llama) -> None:
    import numpy as np

    import graphprune
    from graphprune.tools.generate import decode_rate, greedy

    model = graphprune.load_model(genai_llama)
    prompt = np.array([[5, 6, 7, 8]])
    steps: list[float] = []
    tokens, _ = greedy(model, prompt, 6, step_seconds=steps)
    assert tokens.shape == (1, 6) and len(steps) == 6 and all(s > 0 for s in steps)
    rates = decode_rate({"a": model}, prompt, 6, rounds=2)
    assert set(rates) == {"a"} and 0 < rates["a"] < 1e6
