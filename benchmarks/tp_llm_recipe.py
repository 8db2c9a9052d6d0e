"""Torch-Pruning's LLM recipe (its examples/LLMs/prune_llm.py) on a Hugging Face Llama folder: the
peer row of `llm_quality.py`, run in Torch-Pruning's own environment.

    python -m venv /tmp/tp-env
    /tmp/tp-env/bin/pip install torch transformers==4.48.3 torch-pruning==1.6.1
    /tmp/tp-env/bin/python benchmarks/tp_llm_recipe.py HF_FOLDER OUT_FOLDER --share 0.2 --example 19556,905,30

Torch-Pruning 1.6.1 never finishes building its dependency graph for a GQA Llama under
transformers 5 (it loops in `get_pruning_group`, even for one layer; upstream issue #527 reports
the same on Qwen3), so the recipe runs with transformers 4.48.3, the version its example was
written for. No graphprune import: this file runs in that environment.

The recipe as the example runs it: `BasePruner`, group L2 magnitude (mean over the group), one
uniform ratio r for the hidden size, the FFN and the query heads (within each KV group, KV heads
stay), `round_to=4`, `lm_head` ignored, example input "Hello world.", then the example's config
write-back. The example takes r from the user; here r is the one whose pruned shapes remove the
share of non-embedding parameters closest to `--share`, found on a one-layer copy (every layer is
cut the same). Prints one JSON line: r, seconds, the new config figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch_pruning as tp
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM


def prune(model, ratio: float, example: torch.Tensor) -> None:
    """The example's pruner on `model`, in place, and its config write-back."""
    num_heads = {}
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[module.q_proj] = model.config.num_attention_heads
            num_heads[module.k_proj] = model.config.num_key_value_heads
            num_heads[module.v_proj] = model.config.num_key_value_heads
    pruner = tp.pruner.BasePruner(
        model, example_inputs=example, importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False, output_transform=lambda out: out.logits, pruning_ratio=ratio,
        ignored_layers=[model.lm_head], num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=ratio, round_to=4)
    for group in pruner.step(interactive=True):
        group.prune()
    model.config.hidden_size = model.lm_head.in_features
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            model.config.num_attention_heads = module.q_proj.out_features // module.head_dim
            model.config.num_key_value_heads = module.k_proj.out_features // module.head_dim
        elif name.endswith("mlp"):
            model.config.intermediate_size = module.gate_proj.out_features


def non_embedding(model) -> int:
    """Parameters outside the (tied) embedding, per the layer count of the full model."""
    return sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name and "lm_head" not in name)


def ratio_for(config: LlamaConfig, share: float, example: torch.Tensor) -> float:
    """The ratio (to 1e-3) whose one-layer cut removes the share closest to `share`."""
    small = config.to_dict() | {"num_hidden_layers": 1, "vocab_size": 1024, "tie_word_embeddings": True}

    def removed(ratio: float) -> float:
        model = LlamaForCausalLM(LlamaConfig(**small)).eval()
        before = non_embedding(model)
        prune(model, ratio, example.clamp(max=1023))
        return 1 - non_embedding(model) / before

    low, high = 0.0, 0.9
    for _ in range(10):
        middle = (low + high) / 2
        low, high = (middle, high) if removed(middle) < share else (low, middle)
    return min((low, high), key=lambda r: abs(removed(r) - share))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="Hugging Face Llama folder")
    parser.add_argument("out", type=Path)
    parser.add_argument("--share", type=float, required=True, help="share of non-embedding parameters to remove")
    parser.add_argument("--example", required=True,
                        help='the token ids of "Hello world." separated by commas (the tokenizer files of newer '
                             "transformers do not load in 4.48; the caller copies them into OUT)")
    args = parser.parse_args()
    torch.manual_seed(0)
    example = torch.tensor([[int(i) for i in args.example.split(",")]])
    model = AutoModelForCausalLM.from_pretrained(args.source, torch_dtype=torch.float32).eval()
    ratio = ratio_for(model.config, args.share, example)
    start = time.perf_counter()
    prune(model, ratio, example)
    seconds = time.perf_counter() - start
    model.save_pretrained(args.out)
    config = model.config
    print(json.dumps({"ratio": round(ratio, 4), "tp_seconds": round(seconds, 1),
                      "config": {k: getattr(config, k) for k in ("hidden_size", "num_attention_heads",
                                                                  "num_key_value_heads", "intermediate_size")}}))


if __name__ == "__main__":
    main()
