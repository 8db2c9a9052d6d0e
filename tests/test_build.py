"""`graphprune build`: configs are checked key by key, stages are cached by content, a failed stage
names itself, the output folder is what a runtime loads, and the report opens in a real browser.

The examples in examples/ run here in small versions (the same files, with overrides that shrink
the model, the data and the timing)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphprune import runtime
from graphprune.build import BuildError, ConfigKeyError, build, load_config, plan
from graphprune.tools.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL_TIMING = {"batch": 2, "runs": 3, "repeats": 1, "warmup": 1}


def small_resnet(output: Path, **sections: dict) -> dict:
    """examples/resnet50.toml with ResNet-18 at 64x64 and a few samples."""
    overrides = {"build": {"output": str(output)}, "source": {"factory": "torchvision.models:resnet18", "kwargs": {}},
                 "export": {"inputs": {"image": [1, 3, 64, 64]}}, "data": {"samples": 12, "eval_samples": 8},
                 "quantize": {"samples": 8}, "bench": SMALL_TIMING}
    for name, values in sections.items():
        overrides[name] = overrides.get(name, {}) | values
    return overrides


@pytest.fixture(scope="module")
def resnet_build(tmp_path_factory: pytest.TempPathFactory):
    output = tmp_path_factory.mktemp("resnet") / "out"
    return build(EXAMPLES / "resnet50.toml", small_resnet(output))


def test_every_example_config_loads() -> None:
    names = sorted(p.name for p in EXAMPLES.glob("*.toml"))
    assert names == ["minilm.toml", "resnet50.toml", "smollm2.toml"]
    for name in names:
        config = load_config(EXAMPLES / name)
        assert config.output.parent == EXAMPLES


@pytest.mark.parametrize(("text", "message"), [
    ("[source]\nonnx = 'm.onnx'\n[prune]\nratoi = 0.5\n",
     "c.toml: [prune] unknown key 'ratoi' (keys: ratio, threshold, importance,"),
    ("[source]\nonnx = 'm.onnx'\n[prune]\nratio = 1.5\n", "c.toml: [prune] ratio: "),
    ("[source]\nonnx = 'm.onnx'\n[quantize]\nmode = 'int4'\n",
     "c.toml: [quantize] mode: must be one of dynamic, static, weight-only, got 'int4'"),
    ("[source]\nonnx = 'm.onnx'\n[bench]\nruns = 0\n", "c.toml: [bench] runs: must be at least 1, got 0"),
    ("[source]\nonnx = 'm.onnx'\n[data]\ncalibration = 'imagenet'\n", "c.toml: [data] calibration: must be one of"),
    ("[source]\nonnx = 'm.onnx'\nhf = 'folder'\n", "c.toml: [source] onnx/hf/factory/optimum: give exactly one"),
    ("[prune]\nratio = 0.5\n", "c.toml: [source] is missing"),
    ("[source]\nonnx = 'm.onnx'\n[recover]\nreconstruct = true\n", "c.toml: [recover] (section): recovery needs"),
    ("[source]\nonnx = 'm.onnx'\n[recover]\ndistill = { epoch = 2 }\n[prune]\nratio = 0.5\n",
     "c.toml: [recover] distill.epoch: unknown"),
    ("[sources]\nonnx = 'm.onnx'\n", "c.toml: unknown section [sources]"),
    ("[source]\nonnx = 'm.onnx'\n[fuse]\nopt_level = true\n", "c.toml: [fuse] opt_level: must be"),
    ("[source\n", "c.toml: not valid TOML"),
])
def test_an_invalid_config_gets_one_line_naming_the_key(tmp_path: Path, capsys, text: str, message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(ConfigKeyError) as caught:
        load_config(config)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert main(["-q", "build", str(config)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("graphprune: error: ") and message in err and len(err.splitlines()) == 1
    assert config.read_text() == text


def test_resnet_example_small(resnet_build) -> None:
    """examples/resnet50.toml, small: every stage ran, the model in the output folder runs and keeps
    the dense model's output shape, every row of the report has its figures."""
    result = resnet_build
    assert result.ran == ["export", "prune", "quantize", "quantize (dense)", "verify", "bench"]
    rows = {row["row"]: row for row in result.report["table"]}
    assert list(rows) == ["dense", "pruned", "pruned int8", "dense int8"]
    for row in rows.values():
        assert row["latency_ms"] > 0 and row["quality"] is not None and row["params"] > 0 and row["macs"] > 0
    assert rows["pruned"]["params"] < 0.5 * rows["dense"]["params"]
    assert rows["pruned int8"]["file_bytes"] < 0.35 * rows["pruned"]["file_bytes"]  # int8 weights
    assert rows["pruned"]["macs"] < 0.5 * rows["dense"]["macs"]
    assert rows["dense"]["quality"] == 1.0 and rows["dense int8"]["metric"] == "agreement"
    assert set(result.report["comparisons"]) == {"pruned vs dense", "pruned int8 vs dense int8"}
    quantize = result.step("quantize").stats
    assert quantize["mode"] == "static QDQ" and "crops of scikit-learn's china.jpg" in quantize["calibration"]
    final = onnx.load(str(result.output / "model.onnx"))
    onnx.checker.check_model(final)
    assert {n.op_type for n in final.graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv"}
    image = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    out, = runtime.session(final).run(None, {"image": image})
    assert out.shape == (3, 1000)
    assert "photos:flower" not in result.report["evaluation"] and "flower.jpg" in result.report["evaluation"]


def test_changing_only_quantize_reruns_only_quantize(resnet_build) -> None:
    """Same config but per-channel off: export and prune come from the cache; the quantized models,
    and what reads them (verify, bench), are made again; a second identical run makes nothing."""
    config = load_config(EXAMPLES / "resnet50.toml", small_resnet(resnet_build.output,
                                                                     quantize={"per_channel": False}))
    result = build(EXAMPLES / "resnet50.toml", small_resnet(resnet_build.output, quantize={"per_channel": False}))
    assert result.ran == ["quantize", "quantize (dense)", "verify", "bench"]
    assert result.reused == ["export", "prune"]
    again = build(EXAMPLES / "resnet50.toml", small_resnet(resnet_build.output, quantize={"per_channel": False}))
    assert again.ran == [] and again.report["table"] == result.report["table"]
    _, steps = plan(config)
    assert [s.key for s in steps] == [s.key for s in result.steps]


def test_a_failed_stage_names_itself_and_keeps_earlier_outputs(resnet_build, tmp_path: Path, capsys) -> None:
    overrides = small_resnet(resnet_build.output, data={"evaluation": f"npz:{tmp_path / 'missing.npz'}"})
    before = sorted(p.name for p in resnet_build.config.cache.iterdir())
    with pytest.raises(BuildError, match=r"^stage verify failed: calibration file .*missing.npz does not exist$"):
        build(EXAMPLES / "resnet50.toml", overrides)
    after = sorted(p.name for p in resnet_build.config.cache.iterdir())
    assert after == before  # earlier stages intact, nothing half-written left


def test_dry_run_prints_the_plan_and_runs_nothing(resnet_build, tmp_path: Path, capsys) -> None:
    config = tmp_path / "small.toml"
    text = (EXAMPLES / "resnet50.toml").read_text()
    text = text.replace('output = "resnet50-build"', f'output = "{resnet_build.output}"')
    text = text.replace("torchvision.models:resnet50", "torchvision.models:resnet18").replace(
        "kwargs = { num_classes = 1000 }", "kwargs = {}").replace("[1, 3, 224, 224]", "[1, 3, 64, 64]")
    text = text.replace("samples = 64\neval_samples = 64", "samples = 12\neval_samples = 8").replace(
        "samples = 32", "samples = 8").replace("batch = 1\nruns = 20\nrepeats = 3", "batch = 2\nruns = 3\nrepeats = 1\nwarmup = 1")
    config.write_text(text)
    stages = sorted(p.name for p in resnet_build.config.cache.iterdir())
    assert main(["build", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"export\s.*\scached", out) and re.search(r"prune \+ reconstruct\s.*\scached", out)
    assert sorted(p.name for p in resnet_build.config.cache.iterdir()) == stages
    changed = config.with_name("changed.toml")
    changed.write_text(text.replace("ratio = 0.5", "ratio = 0.25"))
    assert main(["build", str(changed), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"export\s.*\scached", out) and re.search(r"prune \+ reconstruct\s.*\sruns", out)
    assert re.search(r"verify\s.*\sruns", out)


def test_minilm_example_small(tmp_path: Path) -> None:
    """examples/minilm.toml, small (L2 scores, 16 sentences of 32 tokens): heads and FFN halved, fused
    with the pruned head count, INT8; the output folder has config.json with the pruned sizes and
    the tokenizer, and the quantized model embeds held-out text close to the dense model."""
    output = tmp_path / "out"
    result = build(EXAMPLES / "minilm.toml", {"build": {"output": str(output)}, "prune": {"importance": "l2"},
                                              "data": {"samples": 16, "eval_samples": 8, "seq": 32},
                                              "bench": SMALL_TIMING})
    rows = {row["row"]: row for row in result.report["table"]}
    assert list(rows) == ["dense", "pruned", "pruned fused", "pruned fused int8", "dense fused", "dense fused int8"]
    assert all(row["quality"] is not None and row["latency_ms"] > 0 for row in rows.values())
    assert rows["dense fused"]["quality"] > 0.9999 and rows["dense fused int8"]["quality"] > 0.9
    fuse = result.step("fuse").stats
    assert fuse["num_heads"] == 6 and fuse["hidden_size"] == 192 and fuse["fused"]["SkipLayerNormalization"] == 12
    assert result.step("fuse", reference=True).stats["num_heads"] == 12
    config = json.loads((output / "config.json").read_text())
    assert config["num_attention_heads"] == 6 and config["intermediate_size"] == 768
    assert {"tokenizer.json", "vocab.txt"} <= set(result.report["output"]["tokenizer"])
    assert "data-set descriptions" in result.report["evaluation"]
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(output)(["The build folder holds what the runtime loads."],
                                                   return_tensors="np")
    session = runtime.session(onnx.load(str(output / "model.onnx")))
    hidden, = session.run(None, {"input_ids": tokens["input_ids"].astype(np.int64),
                                 "attention_mask": tokens["attention_mask"].astype(np.int64)})
    assert hidden.shape == (1, tokens["input_ids"].shape[1], 384)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    raise AssertionError("no Chromium: install it (Debian: apt-get install chromium); .ci/run does")


def _open_in_chromium(page: Path, screenshot: Path) -> list[str]:
    """The console messages Chromium logs while loading `page` headless (and its screenshot)."""
    done = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", f"--screenshot={screenshot}", "--window-size=1280,2400", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert screenshot.is_file(), done.stderr[-2000:]
    return [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


def test_the_report_opens_in_headless_chromium(resnet_build, tmp_path: Path) -> None:
    from graphprune.testing import check_png

    broken = tmp_path / "broken.html"  # the check sees console errors where there are some
    broken.write_text("<html><body><script>console.error('boom'); missing();</script></body></html>")
    assert len(_open_in_chromium(broken, tmp_path / "broken.png")) == 2
    page = resnet_build.output / "report.html"
    assert _open_in_chromium(page, tmp_path / "report.png") == []
    check_png(tmp_path / "report.png", min_height=2000, min_width=1200)
    text = page.read_text()
    assert "<script" not in text and "http" not in text.split("<body>")[1]  # offline: nothing fetched
    charts = re.findall(r"src='data:image/png;base64,([^']+)'", text)
    assert len(charts) == len(resnet_build.report["charts"]) >= 2
    for row in ("pruned int8", "dense int8", "agreement"):
        assert row in text


def test_recover_distills_the_pruned_model_toward_the_dense_one(resnet_build) -> None:
    """[recover] distill: a stage of its own between prune and quantize (prune is reused), trained on
    the calibration data; the distillation loss falls."""
    result = build(EXAMPLES / "resnet50.toml", small_resnet(resnet_build.output, recover={
        "distill": {"epochs": 2, "batch": 4, "lr": 1e-4}}))
    assert result.ran[:1] == ["recover"] and "prune" in result.reused and "export" in result.reused
    stats = result.step("recover").stats
    assert stats["loss_after"] < stats["loss_before"] and stats["steps"] == 6
    rows = [row["row"] for row in result.report["table"]]
    assert rows == ["dense", "pruned", "distilled", "distilled int8", "dense int8"]


SWEEP = """
[build]
output = "{output}"
[source]
factory = "graphprune.models.digits:DigitsCNN"
[data]
calibration = "digits"
evaluation = "photos:flower"
samples = 16
eval_samples = 8
[prune]
importance = "l2"
[quantize]
mode = "dynamic"
[bench]
batch = 2
runs = 3
repeats = 1
warmup = 1
[sweep]
engine = "ray"
vary = {{ "prune.ratio" = [0.25, 0.5] }}
"""


def test_a_sweep_runs_its_variants_as_ray_tasks_sharing_one_cache(tmp_path: Path, capsys) -> None:
    """Two ratios as Ray tasks: the export and the dense model's quantize run once (shared cache);
    each variant has its own output folder and report; run again (in-process), nothing is made."""
    from graphprune.build.sweep import run_sweep

    config = tmp_path / "sweep.toml"
    config.write_text(SWEEP.format(output=tmp_path / "out"))
    summary = run_sweep(config)
    names = [v["variant"] for v in summary["variants"]]
    assert names == ["ratio=0.25", "ratio=0.5"] and summary["engine"] == "ray"
    stages = sorted(p.name.split("-")[0] for p in (tmp_path / "out" / ".stages").iterdir())
    assert stages.count("export") == 1 and stages.count("prune") == 2 and stages.count("quantize") == 3
    params = [[r for r in v["table"] if r["row"] == "pruned"][0]["params"] for v in summary["variants"]]
    assert params[0] > params[1]
    for name in names:
        assert (tmp_path / "out" / name / "model.onnx").is_file() and (tmp_path / "out" / name / "report.html").is_file()
    assert main(["build", str(config), "--engine", "local"]) == 0
    again = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert again["engine"] == "local" and again["variants"][0]["table"] == summary["variants"][0]["table"]
    for name in names:
        report = json.loads((tmp_path / "out" / name / "report.json").read_text())
        assert all(stage["cached"] for stage in report["stages"])


#: loads a folder with Optimum's ORTModelForCausalLM and greedily generates (run by the Optimum venv)
OPTIMUM_GENERATE = """
import json, sys
import torch
from optimum.onnxruntime import ORTModelForCausalLM
folder, prompt, count = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = ORTModelForCausalLM.from_pretrained(folder)
ids = torch.tensor([prompt])
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count, min_new_tokens=count,
                     do_sample=False)
print(json.dumps(out[0].tolist()))
"""


def optimum_python() -> str:
    """The interpreter of the Optimum environment (.ci/setup makes .venv-optimum)."""
    import os

    found = os.environ.get("GRAPHPRUNE_OPTIMUM_PYTHON") or str(EXAMPLES.parent / ".venv-optimum" / "bin" / "python")
    if not Path(found).is_file():
        raise AssertionError(f"no Optimum environment at {found}: run `bash .ci/setup` (or set "
                             "GRAPHPRUNE_OPTIMUM_PYTHON)")
    return found


def test_decoder_example_small(tmp_path: Path) -> None:
    """examples/smollm2.toml, small (a random 2-layer LLaMA with grouped-query attention): exported with
    a KV cache by onnxruntime-genai's builder, FFN pruned, distilled, INT8; perplexity in the
    quality column; the output folder loads in Optimum's ORTModelForCausalLM and in
    onnxruntime-genai, and both generate greedily what graphprune's own KV-cache loop generates."""
    import random

    import graphprune
    from graphprune.models.genai import llama_folder
    from graphprune.tools.generate import greedy

    hf = llama_folder(tmp_path / "hf", initializer_range=0.3)  # peaked predictions, something to distill
    for name, seed in (("calib.txt", 0), ("eval.txt", 1)):  # the tokenizer knows words w3..w99
        words = random.Random(seed)
        (tmp_path / name).write_text("\n".join(" ".join(f"w{words.randrange(3, 100)}" for _ in range(20))
                                               for _ in range(40)))
    output = tmp_path / "out"
    result = build(EXAMPLES / "smollm2.toml", {
        "build": {"output": str(output)}, "source": {"hf": str(hf)},
        "data": {"calibration": f"text:{tmp_path / 'calib.txt'}", "evaluation": f"text:{tmp_path / 'eval.txt'}",
                 "samples": 8, "eval_samples": 4, "seq": 16},
        "prune": {"neuron_ratio": 0.25},  # without the refit, so that distillation has something to recover
        "recover": {"reconstruct": False, "distill": {"epochs": 2, "batch": 4, "lr": 1e-3, "loss": "kl", "top_k": 16}},
        "verify": {"max_perplexity_ratio": 2.0}, "bench": SMALL_TIMING})
    assert result.step("export").stats["kv_cache"]
    rows = {row["row"]: row for row in result.report["table"]}
    assert list(rows) == ["dense", "pruned", "distilled", "distilled int8", "dense int8"]
    assert all(row["metric"] == "perplexity" and row["quality"] > 1 for row in rows.values())
    stats = result.step("recover").stats
    assert stats["loss_after"] < stats["loss_before"]
    config = json.loads((output / "config.json").read_text())
    assert (config["intermediate_size"], config["num_key_value_heads"], config["head_dim"]) == (96, 2, 16)
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert (output / "genai_config.json").is_file() and (output / "tokenizer.json").is_file()
    assert json.loads((output / "tokenizer_config.json").read_text())["model_input_names"] == ["input_ids", "attention_mask"]
    assert not list(output.rglob("*.onnx"))[1:]  # one model in the folder: runtimes search it

    prompt = [5, 17, 23, 42]
    ours, _ = greedy(graphprune.load_model(output / "model.onnx"), np.array([prompt]), 8)
    expected = prompt + ours[0].tolist()
    done = subprocess.run([optimum_python(), "-c", OPTIMUM_GENERATE, str(output), json.dumps(prompt), "8"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected
    import onnxruntime_genai as og

    model = og.Model(str(output))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(expected), do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    assert np.asarray(generator.get_sequence(0)).tolist() == expected


def test_provider_cuda_reaches_the_stages_that_run_models(resnet_build, caplog) -> None:
    """--provider cuda: bench asks ONNX Runtime for CUDA; this CPU-only onnxruntime falls back to the
    CPU with a warning (so the figures say which provider ran them)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="graphprune"):
        result = build(EXAMPLES / "resnet50.toml", small_resnet(resnet_build.output, build={"provider": "cuda"}))
    assert result.report["provider"] == "cuda" and result.ran == ["verify", "bench"]
    assert any("no CUDAExecutionProvider" in r.getMessage() for r in caplog.records)
    assert {m["provider"] for m in result.step("bench").stats["models"].values()} == {"CPUExecutionProvider"}


def test_optimum_exports_and_optimum_folders(tmp_path: Path) -> None:
    """[export] exporter = "optimum" runs Optimum's exporter in its own interpreter (a KV-cache
    decoder as Optimum writes it); that export folder is in turn a `[source] optimum`."""
    from graphprune.models.genai import llama_folder

    hf = llama_folder(tmp_path / "hf", initializer_range=0.3)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(f"w{3 + (i * 7 + j) % 97}" for j in range(20)) for i in range(40)))
    common = f"""
[data]
calibration = "text:{text}"
evaluation = "text:{text}"
samples = 4
eval_samples = 2
seq = 16
[prune]
ratio = 0.0
neuron_ratio = 0.25
"""
    exported = tmp_path / "exported.toml"
    exported.write_text(f"""[build]
output = "{tmp_path / 'a'}"
[source]
hf = "{hf}"
[export]
exporter = "optimum"
python = "{optimum_python()}"
""" + common)
    first = build(exported)
    export = first.step("export")
    assert export.stats["kv_cache"] and (export.model.parent / "config.json").is_file()
    rows = {row["row"]: row for row in first.report["table"]}
    assert rows["dense"]["metric"] == "perplexity" and rows["pruned"]["quality"] > 1
    folder = tmp_path / "optimum-folder"
    shutil.copytree(export.model.parent, folder)
    again = tmp_path / "folder.toml"
    again.write_text(f"""[build]
output = "{tmp_path / 'b'}"
[source]
optimum = "{folder}"
""" + common)
    second = build(again)
    assert second.ran[0] == "prune" and second.report["table"][0]["stage"] == "source"
    assert second.report["table"][1]["quality"] == pytest.approx(rows["pruned"]["quality"])
    assert json.loads((tmp_path / "b" / "config.json").read_text())["intermediate_size"] == 96


def test_the_shipped_model_must_meet_the_quality_floor(resnet_build) -> None:
    """[verify] min_quality judges the model the build ships (the last of the pruned chain) and names
    it; the cache keeps every model stage."""
    with pytest.raises(BuildError, match=r"^stage verify failed: pruned int8: agreement [0-9.]+ is below "
                                         r"\[verify\] min_quality 1.01$"):
        build(EXAMPLES / "resnet50.toml", small_resnet(resnet_build.output, verify={"min_quality": 1.01}))
