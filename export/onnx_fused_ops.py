"""The ONNX export's fused operators: onnxruntime's own nodes for RMSNorm, RoPE and attention.

Per layer: SimplifiedLayerNormalization for each RMSNorm, two RotaryEmbedding nodes (queries, keys) and
one GroupQueryAttention node.

Written as plain ONNX operators, a layer was ~70 small nodes (reshapes, transposes, RoPE's slices, the
KV-cache Concat, the masked softmax, RMSNorm's seven) whose per-node overhead dominated quantized decode
(MatMulNBits was a quarter of an int4 step; bench/results/onnx_fused_before_after.md has before/after). GroupQueryAttention does
the cache append and the attention in one kernel and takes each layer's own head and KV-head counts as
attributes, so irregular layers stay irregular.

The exporter sees torch custom ops (effllm::rms_norm, effllm::rotary_embedding,
effllm::group_query_attention) whose ONNX translations are those nodes (the exporter's own RMSNorm,
Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul/Mul, is a pattern onnxruntime does not fuse). Their torch
implementations spell out the semantics we rely on (and run if the wrapper is called eagerly);
onnxruntime's kernels are checked against the model by the export's verification and tests:
    RotaryEmbedding: x [b, s, heads*d] at position_ids [b, s], with cos_cache/sin_cache [past+s, d/2]
        (the model's own rotary values for positions 0..past+s-1)
    GroupQueryAttention: query [b, s, heads*d], key/value [b, s, kv_heads*d] (queries and keys rotated)
        past_key/past_value [b, kv_heads, past, d] -> present [b, kv_heads, past+s, d] (past, then new)
        seqlens_k [b] int32 = past+s-1, total_length int32 scalar = past+s
        attention_bias [b, 1, s, past+s]: 0 or a large negative (padding); causality is the op's
Padding is carried by attention_bias, not by seqlens_k: onnxruntime's seqlens_k assumes right padding,
left-padded batches (as Hugging Face pads for generation) need the bias.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("effllm::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (the model's EfficientLLMRMSNorm in fp32)."""
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("effllm::rotary_embedding", mutates_args=())
def rotary_embedding(
    x: torch.Tensor, position_ids: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """RoPE (rotate_half layout) on [b, s, heads*d] at the given positions; caches [positions, d/2]."""
    from effllm.model.modeling_effllm import apply_rotary

    b, s, width = x.shape
    cos = torch.cat([cos_cache[position_ids]] * 2, dim=-1)  # [b, s, d]
    sin = torch.cat([sin_cache[position_ids]] * 2, dim=-1)
    return apply_rotary(x.view(b, s, num_heads, width // num_heads), cos, sin, heads_dim=2).reshape(b, s, width)


@rotary_embedding.register_fake
def _(x, position_ids, cos_cache, sin_cache, num_heads):
    return torch.empty_like(x)


@torch.library.custom_op("effllm::group_query_attention", mutates_args=())
def group_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    seqlens_k: torch.Tensor,
    total_length: torch.Tensor,
    attention_bias: torch.Tensor,
    num_heads: int,
    kv_num_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal attention of the (already rotated) queries over past + new keys; returns the new cache too."""
    from effllm.model.modeling_effllm import repeat_kv

    b, s, _ = query.shape
    d = past_key.shape[-1]
    q = query.view(b, s, num_heads, d).transpose(1, 2)
    k = key.view(b, s, kv_num_heads, d).transpose(1, 2)
    v = value.view(b, s, kv_num_heads, d).transpose(1, 2)
    present_key, present_value = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
    total = present_key.shape[2]
    causal = torch.arange(total)[None, :] <= torch.arange(s)[:, None] + (total - s)
    bias = attention_bias.masked_fill(~causal, float("-inf"))
    groups = num_heads // kv_num_heads
    out = torch.nn.functional.scaled_dot_product_attention(
        q, repeat_kv(present_key, groups), repeat_kv(present_value, groups), attn_mask=bias, scale=scale
    )
    return out.transpose(1, 2).reshape(b, s, num_heads * d), present_key, present_value


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_length, attention_bias, num_heads, kv_num_heads, scale):
    b, s, _ = query.shape
    kv_shape = (b, kv_num_heads, past_key.shape[2] + s, past_key.shape[3])
    return query.new_empty(b, s, num_heads * past_key.shape[3]), past_key.new_empty(kv_shape), past_value.new_empty(kv_shape)


# ---- their ONNX translations: onnxruntime's contrib operators -----------------------------------------------------
# onnx has no schemas for onnxruntime's contrib operators, and onnxscript builds a node only from a
# schema; these describe the part of each signature we use (onnxruntime checks the node against its own).
TYPES = {"T": ["tensor(float)"], "M": ["tensor(int32)"], "I": ["tensor(int64)"]}
ROTARY_INPUTS = (("input", "T"), ("position_ids", "I"), ("cos_cache", "T"), ("sin_cache", "T"))
GQA_INPUTS = (
    ("query", "T"), ("key", "T"), ("value", "T"), ("past_key", "T"), ("past_value", "T"), ("seqlens_k", "M"),
    ("total_sequence_length", "M"), ("cos_cache", "T"), ("sin_cache", "T"), ("position_ids", "I"),
    ("attention_bias", "T"),
)  # fmt: skip


def contrib_op(name: str, inputs, outputs, attributes: dict[str, str], domain: str = "com.microsoft"):
    """An onnxscript Op for onnxruntime's operator ``name`` in ``domain``, from (name, type) pairs."""
    import onnxscript
    from onnx.defs import OpSchema

    optional = OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        name,
        domain,
        1,
        inputs=[OpSchema.FormalParameter(n, t, param_option=optional) for n, t in inputs],
        outputs=[OpSchema.FormalParameter(n, t) for n, t in outputs],
        type_constraints=[(t, types, "") for t, types in TYPES.items() if any(t == k for _, k in (*inputs, *outputs))],
        attributes=[OpSchema.Attribute(n, getattr(OpSchema.AttrType, kind), "") for n, kind in attributes.items()],
    )
    return onnxscript.values.Op(onnxscript.values.Opset(domain, 1), name, schema)


def onnx_rms_norm(x, weight, eps: float):
    """onnxruntime's SimplifiedLayerNormalization (registered by onnxruntime in the default domain)."""
    attributes = {"epsilon": "FLOAT", "axis": "INT", "stash_type": "INT"}
    op = contrib_op("SimplifiedLayerNormalization", [("X", "T"), ("scale", "T")], [("Y", "T")], attributes, domain="")
    return op(x, weight, epsilon=eps, axis=-1, stash_type=1)


def onnx_rotary_embedding(x, position_ids, cos_cache, sin_cache, num_heads: int):
    op = contrib_op("RotaryEmbedding", ROTARY_INPUTS, [("output", "T")], {"num_heads": "INT", "interleaved": "INT"})
    return op(x, position_ids, cos_cache, sin_cache, num_heads=num_heads, interleaved=0)


def onnx_group_query_attention(
    query, key, value, past_key, past_value, seqlens_k, total_length, attention_bias,
    num_heads: int, kv_num_heads: int, scale: float,
):  # fmt: skip
    """RoPE is applied before (onnx_rotary_embedding): GroupQueryAttention's own rotary ignores
    position_ids on a first prompt (onnxruntime 1.32), which breaks left-padded batches."""
    outputs = [("output", "T"), ("present_key", "T"), ("present_value", "T")]
    op = contrib_op("GroupQueryAttention", GQA_INPUTS, outputs, {"num_heads": "INT", "kv_num_heads": "INT", "scale": "FLOAT"})
    return op(
        query, key, value, past_key, past_value, seqlens_k, total_length, None, None, None, attention_bias,
        num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale,
    )  # fmt: skip


def translation_table() -> dict:
    """custom_translation_table for torch.onnx.export."""
    return {
        torch.ops.effllm.rms_norm.default: onnx_rms_norm,
        torch.ops.effllm.rotary_embedding.default: onnx_rotary_embedding,
        torch.ops.effllm.group_query_attention.default: onnx_group_query_attention,
    }


def rotary_caches(rotary_emb, hidden: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[total, d/2] cos and sin of the model's own RoPE (any scaling type) for positions 0..total-1."""
    cos, sin = rotary_emb(hidden, torch.arange(total, device=hidden.device)[None])
    half = cos.shape[-1] // 2
    return cos[0, :, :half], sin[0, :, :half]


def padding_bias(attention_mask: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[b, 1, s, total]: 0 for keys that are real tokens, a large negative for padding keys.

    A query may always attend to itself, so a padding query's row stays finite (as in the model's own
    mask): a NaN there would reach the cache and, through it, every later token.
    """
    total = attention_mask.shape[1]
    key_pos = torch.arange(total, device=attention_mask.device)
    query_pos = torch.arange(query_len, device=attention_mask.device) + (total - query_len)
    allowed = attention_mask[:, None, None, :].bool() | (key_pos[None, :] == query_pos[:, None])[None, None]
    return torch.zeros_like(allowed, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
