"""An EfficientLLM whose layers all have one shape, as a stock transformers Llama or Qwen2 model.

What ``effllm-train --shape uniform`` saves beside its effllm model: a checkpoint that stock
``AutoModelForCausalLM`` loads without trust_remote_code, and that servers assuming one head count and
one FFN width (vLLM, TensorRT-LLM, llama.cpp's llama architecture) accept. effllm's attention bias
covers q/k/v only, as Qwen2's does, while Llama's ``attention_bias`` also adds one to o_proj: a model
with attention biases (and none in the MLP) becomes a Qwen2, every other one a Llama. LlamaConfig
refuses a hidden size that is not a multiple of the head count even when head_dim is given, which a
pruned hidden size often is not: such a model becomes a Mistral without sliding window, the same network
under a config that takes head_dim as it is (vLLM and llama.cpp run it as a Llama).
"""

from __future__ import annotations

import torch

from effllm.common.errors import EffllmError


class NotUniformError(EffllmError):
    """The model's layers differ in shape, so no stock Llama/Qwen2 config can describe it."""


def plain_architecture(config, heads: int) -> str:
    """``"qwen2"``, ``"llama"`` or ``"mistral"``: the stock architecture that computes exactly this model."""
    if config.attention_bias and not config.mlp_bias:
        return "qwen2"
    if config.hidden_size % heads == 0:
        return "llama"
    if not (config.attention_bias or config.mlp_bias):
        return "mistral"
    raise NotUniformError(
        f"hidden size {config.hidden_size} is not a multiple of {heads} heads and the model has MLP biases: no stock "
        f"architecture holds both; prune with --min-hidden-size {config.hidden_size + -config.hidden_size % heads}"
    )


def plain_config(config):
    """The stock LlamaConfig / Qwen2Config of a uniform EfficientLLMConfig; NotUniformError otherwise."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    shape = config.uniform_layer_shape()
    if shape is None:
        shapes = set(config.layer_shapes())
        raise NotUniformError(
            f"the model's layers have {len(shapes)} different shapes (heads, KV heads, FFN) "
            f"{sorted(shapes)[:3]}; only a model pruned with --shape uniform saves as a plain Llama/Qwen2"
        )
    heads, kv_heads, ffn = shape
    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=ffn,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=config.head_dim,  # explicit: pruning the hidden size leaves hidden / heads meaningless
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=dict(config.rope_parameters) if config.rope_parameters else None,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )
    arch = plain_architecture(config, heads)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    return LlamaConfig(**common, attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)


def to_plain(model):
    """A LlamaForCausalLM / Qwen2ForCausalLM with exactly ``model``'s weights (same parameter names)."""
    from transformers import AutoModelForCausalLM

    config = plain_config(model.config)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if config.model_type == "llama" and config.attention_bias:
        # Llama's attention_bias adds an o_proj bias that effllm's q/k/v-only bias does not have: zero.
        for i in range(config.num_hidden_layers):
            state[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(config.hidden_size, dtype=model.dtype)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:  # the layouts are the same by construction: a mismatch is a bug
        raise RuntimeError(
            f"plain {config.model_type} layout differs (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if config.tie_word_embeddings:
        plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.eval()


__all__ = ["NotUniformError", "plain_architecture", "plain_config", "to_plain"]
