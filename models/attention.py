"""Small Hugging Face transformers (random weights, built offline) for the attention rules.

Every builder returns a module whose forward takes plain tensors and returns one tensor, so both
ONNX exporters trace it without the `transformers` output classes. Configs are tiny: a model
exports in a few seconds and runs in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class _Wrapped(nn.Module):
    """`forward(*inputs) -> tensor` around a transformers model (eager attention, no cache)."""

    input_names: tuple[str, ...] = ("input_ids",)
    dynamic_axes = (0, 1)  # batch and sequence

    def __init__(self, model: nn.Module, vocab: int, seq: int = 8) -> None:
        super().__init__()
        self.model = model.eval()
        self.vocab, self.seq = vocab, seq

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(0)
        return (torch.randint(0, self.vocab, (batch, self.seq), generator=generator),)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).last_hidden_state


class _WithMask(_Wrapped):
    input_names = ("input_ids", "attention_mask")

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        (ids,) = super().example_inputs(batch)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0  # one padded sentence: the mask must still broadcast over every head
        return ids, mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _Vision(nn.Module):
    input_names = ("pixel_values",)
    dynamic_axes = (0,)

    def __init__(self, model: nn.Module, size: int) -> None:
        super().__init__()
        self.model = model.eval()
        self.size = size

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor]:
        return (torch.randn(batch, 3, self.size, self.size, generator=torch.Generator().manual_seed(0)),)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state


class _Logits(_WithMask):
    """A model with a task head: its output is logits, so the hidden size is prunable too."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}


def _seed() -> None:
    torch.manual_seed(0)


def bert() -> nn.Module:
    """BERT encoder with an attention mask: separate Q/K/V Linear layers, GELU MLP, LayerNorm."""
    from transformers import BertConfig, BertModel

    _seed()
    config = BertConfig(vocab_size=100, max_position_embeddings=32, attn_implementation="eager", **SMALL)
    return _WithMask(BertModel(config, add_pooling_layer=False), config.vocab_size)


def gpt2() -> nn.Module:
    """GPT-2: fused QKV (`c_attn`, a Conv1D exported as MatMul/Gemm then Split), causal mask."""
    from transformers import GPT2Config, GPT2Model

    _seed()
    config = GPT2Config(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4, n_inner=128,
                        bos_token_id=0, eos_token_id=0,
                        attn_implementation="eager")
    return _WithMask(GPT2Model(config), config.vocab_size)


def llama(layers: int = SMALL["num_hidden_layers"]) -> nn.Module:
    """LLaMA with grouped-query attention (4 query heads share 2 KV heads), RoPE, SwiGLU, RMSNorm."""
    from transformers import LlamaConfig, LlamaModel

    _seed()
    config = LlamaConfig(vocab_size=100, max_position_embeddings=32, num_key_value_heads=2,
                         attn_implementation="eager", **(SMALL | {"num_hidden_layers": layers}))
    return _WithMask(LlamaModel(config), config.vocab_size)


def qwen2() -> nn.Module:
    """Qwen2: GQA like LLaMA, with biases on the Q/K/V projections."""
    from transformers import Qwen2Config, Qwen2Model

    _seed()
    config = Qwen2Config(vocab_size=100, max_position_embeddings=32, num_key_value_heads=2,
                         attn_implementation="eager", **SMALL)
    return _WithMask(Qwen2Model(config), config.vocab_size)


def vit() -> nn.Module:
    """ViT: patch-embedding Conv, class token, pre-norm encoder blocks."""
    from transformers import ViTConfig, ViTModel

    _seed()
    config = ViTConfig(image_size=32, patch_size=8, attn_implementation="eager", **SMALL)
    return _Vision(ViTModel(config, add_pooling_layer=False), config.image_size)


def bert_classifier() -> nn.Module:
    """BERT with pooler and a 3-class head (logits [B, 3])."""
    from transformers import BertConfig, BertForSequenceClassification

    _seed()
    config = BertConfig(vocab_size=100, max_position_embeddings=32, attn_implementation="eager", num_labels=3,
                        **SMALL)
    return _Logits(BertForSequenceClassification(config), config.vocab_size)


def llama_lm() -> nn.Module:
    """LLaMA (GQA) with a language-model head tied to the token embeddings (logits [B, S, V])."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _seed()
    config = LlamaConfig(vocab_size=100, max_position_embeddings=32, num_key_value_heads=2,
                         tie_word_embeddings=True, attn_implementation="eager", **SMALL)
    return _Logits(LlamaForCausalLM(config), config.vocab_size)


#: models whose output is logits: `--prune-hidden` applies
HEADED_BUILDERS: dict[str, Callable[[], nn.Module]] = {"bert_classifier": bert_classifier, "llama_lm": llama_lm}

ATTENTION_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "bert": bert, "gpt2": gpt2, "llama": llama, "qwen2": qwen2, "vit": vit,
}
