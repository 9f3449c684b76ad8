"""ONNX export: a decoder with explicit per-layer KV inputs/outputs, plus what onnxruntime-genai needs.

The exported graph (docs/formats.md, "ONNX"):
    inputs   input_ids [batch, seq], attention_mask [batch, past+seq], position_ids [batch, seq],
             past_key_values.{i}.key / .value [batch, kv_heads_i, past, head_dim]
    outputs  logits [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads_i, past+seq, head_dim]
where i counts only the layers that have attention. kv_heads_i and head_dim are static, so every
layer keeps its own KV-head count; batch, seq and past are dynamic.

The directory written here (model.onnx, genai_config.json, tokenizer files) runs in
onnxruntime-genai as is: genai 0.18 reads each layer's KV-head count from the static input shapes,
so the single num_key_value_heads in genai_config.json does not have to describe every layer.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from .fused_linears import FusedProjections
from .onnx_fused_ops import (
    group_query_attention,
    padding_bias,
    rms_norm,
    rotary_caches,
    rotary_embedding,
    translation_table,
)

ONNX_MODEL_FILE = "model.onnx"
GENAI_CONFIG_FILE = "genai_config.json"
PAST_KEY = "past_key_values.{}.key"
PAST_VALUE = "past_key_values.{}.value"
PRESENT_KEY = "present.{}.key"
PRESENT_VALUE = "present.{}.value"
# Above this many bytes of weights the ONNX protobuf (2 GiB hard limit) keeps them in model.onnx.data.
EXTERNAL_DATA_BYTES = 1 << 30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def kv_heads_per_cache_layer(config) -> list[int]:
    """KV-head count of every attention layer, in past/present order (layers without attention skipped)."""
    shapes = config.layer_shapes()
    return [shapes[i][1] for i in config.attention_layer_indices()]


def past_input_names(config) -> list[str]:
    names = []
    for i in range(len(config.attention_layer_indices())):
        names += [PAST_KEY.format(i), PAST_VALUE.format(i)]
    return names


def present_output_names(config) -> list[str]:
    names = []
    for i in range(len(config.attention_layer_indices())):
        names += [PRESENT_KEY.format(i), PRESENT_VALUE.format(i)]
    return names


def eos_ids(config) -> list[int]:
    eos = config.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


class OnnxDecoder(nn.Module):
    """The model's own modules, with the KV cache passed in and out as plain tensors.

    Reuses the wrapped model's embedding, norms, projections, MLPs and RoPE, so the exported math is
    the model's math; each layer's RoPE and attention (cache append, softmax) are onnxruntime's fused
    RotaryEmbedding and GroupQueryAttention nodes (onnx_fused_ops.py), fed the model's own rotary values.
    A layer's q/k/v projections are one MatMul, and so are its FFN's gate and up (fused_linears.py).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.fused = FusedProjections(model.model.layers)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        inner = self.model.model
        hidden = inner.embed_tokens(input_ids)
        batch, seq = input_ids.shape
        total = attention_mask.shape[1]
        cos_cache, sin_cache = rotary_caches(inner.rotary_emb, hidden, total)
        bias = padding_bias(attention_mask, seq, hidden.dtype)
        # Every row holds all `total` positions (padding is in the bias), so seqlens_k is total-1 for all.
        seqlens_k = torch.full((batch,), total - 1, dtype=torch.int32)
        total_length = torch.full((), total, dtype=torch.int32)
        presents = []
        cache_index = 0
        for index, layer in enumerate(inner.layers):
            attn = layer.self_attn
            if attn is not None:
                q, k, v = self.fused.project_qkv(index, attn, norm(layer.input_layernorm, hidden))
                q = rotary_embedding(q, position_ids, cos_cache, sin_cache, attn.num_heads)
                k = rotary_embedding(k, position_ids, cos_cache, sin_cache, attn.num_kv_heads)
                out, key, value = group_query_attention(
                    q, k, v, past[2 * cache_index], past[2 * cache_index + 1],
                    seqlens_k, total_length, bias, attn.num_heads, attn.num_kv_heads, attn.scaling,
                )  # fmt: skip
                presents += [key, value]
                cache_index += 1
                hidden = hidden + attn.o_proj(out)
            if layer.mlp is not None:
                hidden = hidden + self.fused.mlp(index, layer.mlp, norm(layer.post_attention_layernorm, hidden))
        logits = self.model.lm_head(norm(inner.norm, hidden))
        return (logits, *presents)


def norm(module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm as one onnxruntime node (the exporter writes it as seven)."""
    return rms_norm(hidden, module.weight, module.variance_epsilon)


def example_inputs(config, batch: int = 2, seq: int = 3, past: int = 4) -> tuple[torch.Tensor, ...]:
    """Inputs for tracing: sizes > 1 everywhere, so that no dynamic dimension gets specialised to 0 or 1."""
    input_ids = torch.randint(0, config.vocab_size, (batch, seq))
    attention_mask = torch.ones(batch, past + seq, dtype=torch.long)
    position_ids = torch.arange(past, past + seq)[None].expand(batch, -1).contiguous()
    kv = []
    for heads in kv_heads_per_cache_layer(config):
        kv += [torch.zeros(batch, heads, past, config.head_dim) for _ in range(2)]
    return (input_ids, attention_mask, position_ids, *kv)


def export_onnx(model, out_dir: str | Path, max_seq_len: int, model_dir: str | Path | None = None) -> Path:
    """Export ``model`` (fp32) to out_dir/model.onnx and make out_dir an onnxruntime-genai directory.

    ``model_dir`` is where the tokenizer files are copied from (the directory the model was loaded from).
    """
    from torch.export import Dim

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    wrapper = OnnxDecoder(model.float().eval().requires_grad_(False)).eval()
    past_names = past_input_names(config)
    batch, seq, past = Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length")
    # attention_mask's length is past+seq; AUTO lets torch.export derive that instead of us naming it.
    dynamic_shapes = (
        {0: batch, 1: seq},
        {0: batch, 1: Dim.AUTO},
        {0: batch, 1: seq},
        tuple({0: batch, 2: past} for _ in past_names),
    )
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter says nothing about our graph
        program = torch.onnx.export(
            wrapper,
            example_inputs(config),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_output_names(config)],
            dynamic_shapes=dynamic_shapes,
            custom_translation_table=translation_table(),
            dynamo=True,
            verbose=False,
        )
    program.save(str(out_dir / ONNX_MODEL_FILE), external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    name_symbolic_dims(out_dir / ONNX_MODEL_FILE)
    write_genai_config(config, out_dir, max_seq_len)
    if model_dir is not None:
        copy_tokenizer_files(model_dir, out_dir)
    return out_dir / ONNX_MODEL_FILE


def name_symbolic_dims(path: Path) -> None:
    """Give the graph's input/output dims readable names (the exporter writes s0, s1 + s2, ...)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    renames: dict[str, str] = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name == "attention_mask" and dims[1].dim_param:
            renames[dims[1].dim_param] = "total_sequence_length"
    changed = False
    for value in list(model.graph.input) + list(model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]
                changed = True
            elif dim.dim_param == "past_sequence_length + sequence_length":
                dim.dim_param = "total_sequence_length"
                changed = True
    if changed:
        onnx.save(model, str(path))


def write_genai_config(config, out_dir: Path, max_seq_len: int, filename: str = ONNX_MODEL_FILE) -> Path:
    """genai_config.json for a "decoder" model whose layers may each have their own KV-head count."""
    kv_heads = kv_heads_per_cache_layer(config)
    shapes = config.layer_shapes()
    heads = [shapes[i][0] for i in config.attention_layer_indices()]
    eos = eos_ids(config)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    genai = {
        "model": {
            "bos_token_id": config.bos_token_id if config.bos_token_id is not None else pad,
            "eos_token_id": eos if len(eos) > 1 else (eos[0] if eos else pad),
            "pad_token_id": pad,
            "context_length": int(max_seq_len),
            "vocab_size": config.vocab_size,
            "type": "decoder",
            "decoder": {
                "session_options": {"log_id": "effllm", "provider_options": []},
                "filename": filename,
                "head_size": config.head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": PAST_KEY.replace("{}", "%d"),
                    "past_value_names": PAST_VALUE.replace("{}", "%d"),
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": PRESENT_KEY.replace("{}", "%d"),
                    "present_value_names": PRESENT_VALUE.replace("{}", "%d"),
                },
                # Informational only for irregular models: genai takes each layer's count from the graph.
                "num_attention_heads": max(heads, default=0),
                "num_key_value_heads": max(kv_heads, default=0),
                "num_hidden_layers": len(kv_heads),
            },
        },
        "search": {
            "do_sample": False,
            "early_stopping": True,
            "max_length": int(max_seq_len),
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
    path = Path(out_dir) / GENAI_CONFIG_FILE
    path.write_text(json.dumps(genai, indent=2) + "\n")
    return path


def copy_tokenizer_files(model_dir: str | Path, out_dir: str | Path) -> None:
    """tokenizer.json and friends, with a tokenizer_config.json that onnxruntime-genai understands.

    transformers 5 writes tokenizer_class "TokenizersBackend", a name onnxruntime-extensions does
    not know; the tokenizer.json is a complete fast tokenizer, which it reads as PreTrainedTokenizerFast.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
    config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if tok_config.get("tokenizer_class") in (None, "TokenizersBackend"):
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(tok_config, indent=2) + "\n")
