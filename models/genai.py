"""Decoder graphs as LLM deployments have them: the onnxruntime-genai model builder's export.

The builder (`python -m onnxruntime_genai.models.builder`) turns a Hugging Face model folder into
the graph onnxruntime-genai runs: com.microsoft GroupQueryAttention with packed Q|K|V, rotary
embedding inside the op and a KV cache (`past_key_values.N.key/value` -> `present.N.key/value`),
SkipSimplifiedLayerNormalization, SimplifiedLayerNormalization (ORT's RMSNorm in the default
domain), plus `genai_config.json` and the tokenizer files beside `model.onnx`.

`llama_folder` writes a small random LLaMA (grouped-query attention) with a word-level tokenizer,
built offline, for the builder to read.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

#: the small LLaMA: 4 query heads share 2 KV heads of 16, 2 layers, SwiGLU 128, vocabulary 100
LLAMA = {"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 64}


def llama_folder(folder: Path, seed: int = 0, initializer_range: float = 0.02) -> Path:
    """A Hugging Face folder (config, safetensors weights, tokenizer) of a random small LLaMA
    (`initializer_range`: the weights' standard deviation; larger ones give peaked predictions)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**LLAMA, initializer_range=initializer_range)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, LLAMA["vocab_size"])}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(folder)
    return folder


def genai_export(hf_folder: Path, out: Path, precision: str = "fp32") -> Path:
    """Run the onnxruntime-genai model builder for CPU; returns the path of `model.onnx`."""
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf_folder), "-i", str(hf_folder),
               "-o", str(out), "-p", precision, "-e", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=out.parent)
    if done.returncode != 0:
        raise RuntimeError(f"onnxruntime-genai builder failed: {done.stderr.strip().splitlines()[-1:]}")
    return out / "model.onnx"
