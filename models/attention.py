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


#: attention implementations a builder takes: "default" is what the library picks when the user
#: says nothing (SDPA in transformers 4.48+), "eager" the explicit softmax(QK^T)V graph
ATTENTION_IMPLEMENTATIONS = ("default", "eager", "sdpa")


def _seed() -> None:
    torch.manual_seed(0)


def _attention(attention: str) -> dict[str, str]:
    """Config keyword for an attention implementation ("default" passes none, as users do)."""
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention '{attention}' (choose from {', '.join(ATTENTION_IMPLEMENTATIONS)})")
    return {} if attention == "default" else {"attn_implementation": attention}


def bert(attention: str = "eager") -> nn.Module:
    """BERT encoder with an attention mask: separate Q/K/V Linear layers, GELU MLP, LayerNorm."""
    from transformers import BertConfig, BertModel

    _seed()
    config = BertConfig(vocab_size=100, max_position_embeddings=32, **_attention(attention), **SMALL)
    return _WithMask(BertModel(config, add_pooling_layer=False), config.vocab_size)


def gpt2(attention: str = "eager") -> nn.Module:
    """GPT-2: fused QKV (`c_attn`, a Conv1D exported as MatMul/Gemm then Split), causal mask."""
    from transformers import GPT2Config, GPT2Model

    _seed()
    config = GPT2Config(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4, n_inner=128,
                        bos_token_id=0, eos_token_id=0,
                        **_attention(attention))
    return _WithMask(GPT2Model(config), config.vocab_size)


def llama(layers: int = SMALL["num_hidden_layers"], attention: str = "eager") -> nn.Module:
    """LLaMA with grouped-query attention (4 query heads share 2 KV heads), RoPE, SwiGLU, RMSNorm."""
    from transformers import LlamaConfig, LlamaModel

    _seed()
    config = LlamaConfig(vocab_size=100, max_position_embeddings=32, num_key_value_heads=2,
                         **_attention(attention), **(SMALL | {"num_hidden_layers": layers}))
    return _WithMask(LlamaModel(config), config.vocab_size)


def qwen2(attention: str = "eager") -> nn.Module:
    """Qwen2: GQA like LLaMA, with biases on the Q/K/V projections."""
    from transformers import Qwen2Config, Qwen2Model

    _seed()
    config = Qwen2Config(vocab_size=100, max_position_embeddings=32, num_key_value_heads=2,
                         **_attention(attention), **SMALL)
    return _WithMask(Qwen2Model(config), config.vocab_size)


def vit(attention: str = "eager") -> nn.Module:
    """ViT: patch-embedding Conv, class token, pre-norm encoder blocks."""
    from transformers import ViTConfig, ViTModel

    _seed()
    config = ViTConfig(image_size=32, patch_size=8, **_attention(attention), **SMALL)
    return _Vision(ViTModel(config, add_pooling_layer=False), config.image_size)


def bert_classifier(attention: str = "eager") -> nn.Module:
    """BERT with pooler and a 3-class head (logits [B, 3])."""
    from transformers import BertConfig, BertForSequenceClassification

    _seed()
    config = BertConfig(vocab_size=100, max_position_embeddings=32, **_attention(attention), num_labels=3,
                        **SMALL)
    return _Logits(BertForSequenceClassification(config), config.vocab_size)


def llama_lm(attention: str = "eager", vocab: int = 100) -> nn.Module:
    """LLaMA (GQA) with a language-model head tied to the token embeddings (logits [B, S, V]). With
    a large `vocab` (8192 x 64 floats: 2 MiB) the exporter keeps the tie as a Transpose of the
    embedding table, as it does for a real LLM's, instead of folding it into a second table."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _seed()
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=32, num_key_value_heads=2,
                         tie_word_embeddings=True, **_attention(attention), **SMALL)
    return _Logits(LlamaForCausalLM(config), config.vocab_size)


#: models whose output is logits: `--prune-hidden` applies
HEADED_BUILDERS: dict[str, Callable[[], nn.Module]] = {"bert_classifier": bert_classifier, "llama_lm": llama_lm}

ATTENTION_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "bert": bert, "gpt2": gpt2, "llama": llama, "qwen2": qwen2, "vit": vit,
}


# -- attention outside transformers: torch.nn.MultiheadAttention, torchvision ViT and Swin --------
class _Tensor(nn.Module):
    """`forward(x) -> tensor` around a plain module, with example inputs of a fixed shape."""

    input_names = ("x",)

    def __init__(self, model: nn.Module, shape: tuple[int, ...], dynamic_axes: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model.eval()
        self.shape, self.dynamic_axes = shape, dynamic_axes

    def example_inputs(self) -> tuple[torch.Tensor]:
        return (torch.randn(*self.shape, generator=torch.Generator().manual_seed(0)),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def torch_encoder(batch_first: bool = True) -> nn.Module:
    """nn.TransformerEncoder of two nn.TransformerEncoderLayer: nn.MultiheadAttention with one packed
    `in_proj_weight` [3E, E]; `batch_first=False` takes [seq, batch, E] (PyTorch's default)."""
    _seed()
    layer = nn.TransformerEncoderLayer(SMALL["hidden_size"], SMALL["num_attention_heads"], SMALL["intermediate_size"],
                                       dropout=0.0, batch_first=batch_first)
    encoder = nn.TransformerEncoder(layer, SMALL["num_hidden_layers"], enable_nested_tensor=False)
    # the encoder deep-copies one layer; trained layers differ (and exporters share equal weights)
    for module in encoder.modules():
        if module is not encoder and hasattr(module, "reset_parameters"):
            module.reset_parameters()
        elif isinstance(module, nn.MultiheadAttention):
            module._reset_parameters()
    shape = (2, 8, SMALL["hidden_size"]) if batch_first else (8, 2, SMALL["hidden_size"])
    return _Tensor(encoder, shape, (0, 1))


def torchvision_vit() -> nn.Module:
    """torchvision's VisionTransformer (the `vit_b_16` code, a small config): nn.MultiheadAttention."""
    from torchvision.models import VisionTransformer

    _seed()
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                              num_classes=10)
    return _Tensor(model, (2, 3, 32, 32), (0,))


def torchvision_swin() -> nn.Module:
    """torchvision's SwinTransformer (the `swin_t` code, a small config): window attention with a
    relative position bias table per head, shifted windows in every second block."""
    from torchvision.models import SwinTransformer

    _seed()
    model = SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                            num_classes=10)
    return _Tensor(model, (2, 3, 32, 32), (0,))


#: attention forms beyond transformers' models, by name
MODULE_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "torch_encoder": torch_encoder,
    "torch_encoder_seq_first": lambda: torch_encoder(batch_first=False),
    "torchvision_vit": torchvision_vit,
    "torchvision_swin": torchvision_swin,
}
