"""EfficientLLM: a Llama-family decoder whose layers may each have their own shapes.

Copied into every saved model directory next to configuration_effllm.py, so it imports only torch,
transformers and that file: a machine without effllm loads the model with trust_remote_code.

Every module reads its shapes from its own weights (heads = q_proj rows // head_dim, and so on),
so pruning surgery only has to slice tensors and update the config. A layer whose attention or
FFN has width zero holds ``None`` there and skips the block instead of running empty tensors.
The KV cache is indexed by attention layers only (``config.attention_layer_indices()``), the same
numbering as the exported ONNX past/present tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from .configuration_effllm import EfficientLLMConfig


class EfficientLLMRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class EfficientLLMRotaryEmbedding(nn.Module):
    """RoPE with the scaling types of the supported sources (default, linear, dynamic, llama3)."""

    def __init__(self, config: EfficientLLMConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(
        config: EfficientLLMConfig, device=None, **kwargs
    ) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device, torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads_dim: int = 1) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim] (heads_dim=1) or [batch, seq, heads, head_dim] (heads_dim=2); cos/sin: [batch, seq, head_dim]."""
    cos, sin = cos.unsqueeze(heads_dim), sin.unsqueeze(heads_dim)
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[batch, kv_heads, seq, dim] -> [batch, kv_heads*groups, seq, dim]; KV head j serves query heads j*groups..."""
    if groups == 1:
        return x
    b, kv, s, d = x.shape
    return x[:, :, None].expand(b, kv, groups, s, d).reshape(b, kv * groups, s, d)


class EfficientLLMAttention(nn.Module):
    """Grouped-query attention with this layer's own head counts.

    Split into ``project_qkv`` and ``attend`` so exporters can put their own KV-cache logic
    (explicit past/present for ONNX, in-place buffers for ExecuTorch) between the two.
    """

    def __init__(self, config: EfficientLLMConfig, num_heads: int, num_kv_heads: int):
        super().__init__()
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        d, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(d, num_heads * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, num_kv_heads * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, num_kv_heads * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(num_heads * hd, d, bias=False)

    @property
    def num_heads(self) -> int:
        return self.q_proj.weight.shape[0] // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return self.k_proj.weight.shape[0] // self.head_dim

    def project_qkv(
        self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads_first: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values with RoPE applied: [batch, heads, seq, head_dim], or
        [batch, seq, heads, head_dim] with heads_first=False (the layout of ExecuTorch's attention ops)."""
        b, t, _ = hidden_states.shape
        q, k, v = (
            proj(hidden_states).view(b, t, -1, self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        if heads_first:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        heads_dim = 1 if heads_first else 2
        return apply_rotary(q, cos, sin, heads_dim), apply_rotary(k, cos, sin, heads_dim), v

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool = False
    ) -> torch.Tensor:
        """Scaled dot-product attention over all keys given, then the output projection."""
        groups = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(
            q,
            repeat_kv(k, groups),
            repeat_kv(v, groups),
            attn_mask=mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
            is_causal=is_causal and mask is None,
            scale=self.scaling,
        )
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def forward(self, hidden_states, cos, sin, mask, cache: Cache | None, cache_index: int) -> torch.Tensor:
        q, k, v = self.project_qkv(hidden_states, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, cache_index)
        return self.attend(q, k, v, mask, is_causal=cache is None or k.shape[2] == q.shape[2])


class EfficientLLMMLP(nn.Module):
    def __init__(self, config: EfficientLLMConfig, intermediate_size: int):
        super().__init__()
        d = config.hidden_size
        self.gate_proj = nn.Linear(d, intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(d, intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, d, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class EfficientLLMDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: EfficientLLMConfig, layer_idx: int):
        super().__init__()
        heads, kv_heads, ffn = config.layer_shapes()[layer_idx]
        self.layer_idx = layer_idx
        eps = config.rms_norm_eps
        self.input_layernorm = EfficientLLMRMSNorm(config.hidden_size, eps) if heads else None
        self.self_attn = EfficientLLMAttention(config, heads, kv_heads) if heads else None
        self.post_attention_layernorm = EfficientLLMRMSNorm(config.hidden_size, eps) if ffn else None
        self.mlp = EfficientLLMMLP(config, ffn) if ffn else None

    def forward(self, hidden_states, cos, sin, mask=None, cache=None, cache_index: int = -1) -> torch.Tensor:
        if self.self_attn is not None:
            attn_out = self.self_attn(self.input_layernorm(hidden_states), cos, sin, mask, cache, cache_index)
            hidden_states = hidden_states + attn_out
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class EfficientLLMPreTrainedModel(PreTrainedModel):
    config_class = EfficientLLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EfficientLLMDecoderLayer"]
    _supports_sdpa = True
    _can_compile_fullgraph = False


def build_attention_mask(
    attention_mask: torch.Tensor | None, query_len: int, past_len: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean [batch, 1, query, past+query] mask: causal, and padding keys masked out.

    None when plain causal attention (SDPA's is_causal) is exact: no padding and no past.
    Each query may always attend to itself, so a fully padded row yields finite values, not NaN.
    """
    if attention_mask is None or bool(attention_mask.all()):
        if past_len == 0:
            return None
        attention_mask = None
    key_pos = torch.arange(past_len + query_len, device=device)
    query_pos = torch.arange(query_len, device=device) + past_len
    allowed = key_pos[None, :] <= query_pos[:, None]
    mask = allowed[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -(past_len + query_len) :].bool()
        mask = mask | (key_pos[None, :] == query_pos[:, None])[None, None]
    return mask


class EfficientLLMModel(EfficientLLMPreTrainedModel):
    def __init__(self, config: EfficientLLMConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([EfficientLLMDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = EfficientLLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = EfficientLLMRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache()
        if not use_cache:
            cache = None
        past_len = cache.get_seq_length() if cache is not None else 0
        query_len = inputs_embeds.shape[1]
        if position_ids is None:
            if attention_mask is not None and not bool(attention_mask.all()):
                # Left padding: positions count real tokens only, as for the unpadded sequence.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -query_len:]
            else:
                position_ids = torch.arange(query_len, device=inputs_embeds.device)[None] + past_len
        mask = build_attention_mask(attention_mask, query_len, past_len, inputs_embeds.device)

        hidden_states = inputs_embeds
        cos, sin = self.rotary_emb(hidden_states, position_ids)
        cache_index = 0
        for layer in self.layers:
            hidden_states = layer(hidden_states, cos, sin, mask, cache, cache_index)
            cache_index += layer.self_attn is not None
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


class EfficientLLMForCausalLM(EfficientLLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: EfficientLLMConfig):
        super().__init__(config)
        self.model = EfficientLLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)


__all__ = ["EfficientLLMForCausalLM", "EfficientLLMModel", "EfficientLLMPreTrainedModel"]

# The one place effllm registers with transformers' Auto classes, run when the installed module is
# imported (``from effllm import EfficientLLMForCausalLM`` does it), never by the copy in a model
# directory that trust_remote_code loads. AutoConfig / AutoModelForCausalLM (and AutoTokenizer, which
# reads config.json first) then know model_type "effllm" without trust_remote_code, and
# save_pretrained copies configuration_effllm.py / modeling_effllm.py into the directory with an auto_map.
if __name__ == "effllm.model.modeling_effllm":
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(EfficientLLMConfig.model_type, EfficientLLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(EfficientLLMConfig, EfficientLLMForCausalLM, exist_ok=True)
    EfficientLLMConfig.register_for_auto_class()
    EfficientLLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
