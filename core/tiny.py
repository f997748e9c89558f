"""Seeded tiny random decoders of every supported family and a byte-level tokenizer, built in code,
for fast offline tests (recipe sources ``tiny-llama``, ``tiny-qwen3``, ... ``tiny-qwen3_moe``)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from pqflow.models import cast_float

SPECIALS = ("<s>", "</s>", "<pad>")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: one token per UTF-8 byte, no merges, three special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for tok in SPECIALS:
        vocab[tok] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_config(vocab_size: int = 320) -> LlamaConfig:
    """Llama with GQA (4 query heads, 2 KV heads); 64 divides every input width."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_config())
    return cast_float(model, dtype).eval(), byte_tokenizer()


# Per family: (transformers model_type, config fields beyond the shared tiny shape). Hidden 128, 4
# layers, GQA (4 query heads, 2 KV heads of 32), MLP 384 (MoE: 4 experts of 128, 2 per token).
TINY_FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "gemma2": ("gemma2", {"sliding_window": 32}),
    "gemma3": ("gemma3_text", {"sliding_window": 32}),
    "phi3": ("phi3", {}),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {"residual_multiplier": 0.5, "embedding_multiplier": 2.0, "logits_scaling": 2.0}),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
                                "norm_topk_prob": True}),
}


def tiny_family_config(family: str, vocab_size: int = 320):
    model_type, extra = TINY_FAMILIES[family]
    base = tiny_config(vocab_size).to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id")
    return AutoConfig.for_model(model_type, **{k: base[k] for k in keep}, **extra)


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, PreTrainedTokenizerFast]:
    """The seeded tiny random model of ``family`` (a key of :data:`TINY_FAMILIES`)."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"no tiny model for family '{family}' (known: {', '.join(TINY_FAMILIES)})")
    if family == "llama":
        return tiny_llama(seed, dtype)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_family_config(family))
    return cast_float(model, dtype).eval(), byte_tokenizer()
