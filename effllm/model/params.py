"""Parameter accounting and the one-screen architecture summary, shared by every stage.

Counts come from the config alone (no weights needed), so the pruning schedule can price a
candidate shape before any tensor is sliced; a test checks them against the real modules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from effllm.model.configuration_effllm import EfficientLLMConfig


@dataclass(frozen=True)
class ParameterCount:
    embedding: int
    lm_head: int  # 0 when tied to the embedding: a tied matrix is counted once
    attention: int
    ffn: int
    norms: int

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.attention + self.ffn + self.norms

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding - self.lm_head

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total, "non_embedding": self.non_embedding}


def attention_size(hidden: int, head_dim: int, heads: int, kv_heads: int, bias: bool) -> int:
    """q/k/v/o weights (and q/k/v biases) of one attention block: the one formula every count uses."""
    return hidden * head_dim * (2 * heads + 2 * kv_heads) + (head_dim * (heads + 2 * kv_heads) if bias else 0)


def ffn_size(hidden: int, width: int, bias: bool) -> int:
    """gate/up/down weights (and biases) of one FFN block."""
    return 3 * hidden * width + ((2 * width + hidden) if (bias and width) else 0)


def count_shapes(
    hidden: int, vocab: int, tied: bool, head_dim: int, layer_shapes, attention_bias: bool, mlp_bias: bool
) -> ParameterCount:
    """Parameters of a model with these shapes (``layer_shapes``: (heads, kv_heads, ffn) per layer)."""
    norms = hidden  # the final norm; each layer's two norms exist only with their blocks
    for heads, _, width in layer_shapes:
        norms += hidden * (heads > 0) + hidden * (width > 0)
    return ParameterCount(
        embedding=vocab * hidden,
        lm_head=0 if tied else vocab * hidden,
        attention=sum(attention_size(hidden, head_dim, h, k, attention_bias) for h, k, _ in layer_shapes),
        ffn=sum(ffn_size(hidden, f, mlp_bias) for _, _, f in layer_shapes),
        norms=norms,
    )


def attention_params(config: EfficientLLMConfig, heads: int, kv_heads: int) -> int:
    return attention_size(config.hidden_size, config.head_dim, heads, kv_heads, config.attention_bias)


def ffn_params(config: EfficientLLMConfig, width: int) -> int:
    return ffn_size(config.hidden_size, width, config.mlp_bias)


def count_parameters(config: EfficientLLMConfig) -> ParameterCount:
    return count_shapes(
        config.hidden_size, config.vocab_size, config.tie_word_embeddings, config.head_dim, config.layer_shapes(),
        config.attention_bias, config.mlp_bias,
    )  # fmt: skip


def format_count(n: int) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def parse_count(text: str | int) -> int:
    """'469M', '1.1B', '250k', '12345' -> an integer parameter count."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace("_", "")
    scales = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}
    try:
        if s and s[-1] in scales:
            return int(round(float(s[:-1]) * scales[s[-1]]))
        return int(round(float(s)))
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a parameter count; write e.g. 469M, 1.1B or 250000") from None


def architecture_summary(config: EfficientLLMConfig) -> str:
    """A one-screen table: per-layer heads / KV heads / FFN width, and the parameter totals."""
    count = count_parameters(config)
    lines = [
        f"EfficientLLM: {config.num_hidden_layers} layers, hidden {config.hidden_size}, head_dim {config.head_dim}, "
        f"vocab {config.vocab_size}, {'tied' if config.tie_word_embeddings else 'untied'} embeddings",
        f"{'layer':>5} {'heads':>5} {'kv':>4} {'ffn':>7} {'params':>9}",
    ]
    for i, (heads, kv, width) in enumerate(config.layer_shapes()):
        layer_params = attention_params(config, heads, kv) + ffn_params(config, width)
        lines.append(f"{i:>5} {heads:>5} {kv:>4} {width:>7} {format_count(layer_params):>9}")
    lines.append(
        f"total {format_count(count.total)} ({count.total:,}): embedding {format_count(count.embedding)}, "
        f"lm_head {format_count(count.lm_head)}, attention {format_count(count.attention)}, "
        f"ffn {format_count(count.ffn)}, norms {format_count(count.norms)}"
    )
    return "\n".join(lines)


def count_module_parameters(model) -> int:
    """Parameters of a torch module, each shared (tied) tensor counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
