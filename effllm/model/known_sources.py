"""Shapes of well-known source checkpoints, so that --dry-run plans offline.

The values are those of each model's public config.json on the Hugging Face hub (vocabulary,
hidden size, layers, query heads, KV heads, head dim, FFN width, tied embeddings, q/k/v biases,
context length). Only shapes: weights and tokenizers still come from the hub (or a local copy)
when a run starts. SmolLM2 shares its shapes with SmolLM (longer context, other RoPE base).
"""

from __future__ import annotations

# name: (vocab, hidden, layers, heads, kv_heads, head_dim, ffn, tied, qkv_bias, max_positions)
_SHAPES: dict[str, tuple] = {
    "HuggingFaceTB/SmolLM-135M": (49152, 576, 30, 9, 3, 64, 1536, True, False, 2048),
    "HuggingFaceTB/SmolLM-360M": (49152, 960, 32, 15, 5, 64, 2560, True, False, 2048),
    "HuggingFaceTB/SmolLM-1.7B": (49152, 2048, 24, 32, 32, 64, 8192, True, False, 2048),
    "HuggingFaceTB/SmolLM2-135M": (49152, 576, 30, 9, 3, 64, 1536, True, False, 8192),
    "HuggingFaceTB/SmolLM2-360M": (49152, 960, 32, 15, 5, 64, 2560, True, False, 8192),
    "HuggingFaceTB/SmolLM2-1.7B": (49152, 2048, 24, 32, 32, 64, 8192, True, False, 8192),
    "Qwen/Qwen2.5-0.5B": (151936, 896, 24, 14, 2, 64, 4864, True, True, 32768),
    "Qwen/Qwen2.5-1.5B": (151936, 1536, 28, 12, 2, 128, 8960, True, True, 131072),
    "meta-llama/Llama-3.2-1B": (128256, 2048, 16, 32, 8, 64, 8192, True, False, 131072),
    "meta-llama/Llama-3.2-3B": (128256, 3072, 28, 24, 8, 128, 8192, True, False, 131072),
}


def known_names() -> list[str]:
    return sorted(_SHAPES)


def lookup(name: str) -> str | None:
    """The table's key for ``name`` (exact, or the same model name under any owner, any case), else None."""
    if name in _SHAPES:
        return name
    short = name.rstrip("/").rsplit("/", 1)[-1].lower()
    for key in _SHAPES:
        if key.rsplit("/", 1)[-1].lower() == short:
            return key
    return None


def known_config(name: str):
    """An EfficientLLMConfig with the shapes of ``name``, or None if the table does not hold it."""
    key = lookup(name)
    if key is None:
        return None
    from effllm.model.configuration_effllm import EfficientLLMConfig

    vocab, hidden, layers, heads, kv, head_dim, ffn, tied, bias, positions = _SHAPES[key]
    return EfficientLLMConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=head_dim, intermediate_size=ffn, tie_word_embeddings=tied,
        attention_bias=bias, max_position_embeddings=positions,
    )  # fmt: skip
