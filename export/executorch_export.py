"""ExecuTorch export: a .pte with per-layer KV-cache buffers that ExecuTorch's LLM runner can drive.

The program (docs/formats.md, "ExecuTorch"):
    forward(tokens int64[1, T], input_pos int64[T]) -> logits float[1, 1, vocab] (the last position's)
input_pos holds consecutive positions start..start+T-1, as ExecuTorch's LLM runner passes them.
Only the last position's logits come out, as in ExecuTorch's own LLM exports: generation needs no
more, and with every position's logits the memory plan held a [max_seq_len, vocab] buffer (125 MiB
at 1024 x 32000) from the moment the method loads. Every position's logits, which export
verification compares, come from one call per token (ExecuTorchBackend.forward_all).
Each attention layer owns two buffers that forward updates in place, so layers keep their own
KV-head counts. The constant methods below are what TextLLMRunner (and Android's LlmModule, which
wraps it) read to decide how to call forward.

Attention runs in ExecuTorch's LLM kernels (llama::update_cache, llama::custom_sdpa): they attend
over the filled slots 0..start+T-1 only and serve grouped KV heads without copying the cache,
where the plain-aten version attended over all max_seq_len slots with a mask and repeated the
cache for every query head outside XNNPACK (decode 3.7x slower on the quickstart model at
max_seq_len 256, more with longer caches). They want the cache as [1, max_seq_len, kv_heads_i,
head_dim], not [1, kv_heads_i, max_seq_len, head_dim] as the ONNX cache; the buffers are internal, so
forward's inputs and outputs are unchanged. Every runtime that runs the file must have these
kernels: the executorch-android AAR and runners built with EXECUTORCH_BUILD_KERNELS_LLM=ON do, and
in Python ``effllm.runtime.native.load_llm_kernels()`` registers them (the exporter and effllm's
ExecuTorch backends call it).

8da4w: int8 dynamic activations (per token), int4 weights in groups of ``group_size`` input channels,
with codes from weight_quant.py's calibrated search. A linear whose input width is not a multiple of
the group size (pruning leaves widths like 17) falls back to per-channel weights, and so do the output
projection (lm_head) and the projections of INT8_PROJECTIONS (v_proj, up_proj, down_proj) on purpose.
Those are int8, not int4: XNNPACK in executorch 1.5.1 delegates int4 only as groups whose size is a
multiple of 32 (a per-channel int4 weight reaches it as one group of in_features and is refused), while
int8 per-channel weights (qc8w) run there on every width.
The token embedding is int8 per row (ExecuTorch's quantized_decomposed::embedding_byte, which the
Android AAR and the Python runtime ship): without it the fp32 table was most of the file.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from effllm.runtime.native import load_llm_kernels
from torch import nn

from .onnx_export import eos_ids

PTE_FILE = "model.pte"
DEFAULT_GROUP_SIZE = 32
# Projections 8da4w keeps at int8 per-channel, as llama.cpp's q4_k_m keeps attn_v and ffn_down above 4 bits. On
# the 0.7-pruned SmolLM2-135M (dithered; 8,192 held-out tokens, GPTQ on 8,192 others) all-int4 cost +6.4% ppl
# (top-1 0.841), with v_proj at int8 +5.6% (0.849), v_proj and up_proj +3.8% (0.864); down_proj was the worst
# single type at int4 (+6.9% alone) and its pruned widths are rarely whole groups anyway.
INT8_PROJECTIONS = ("self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")


class ExecuTorchDecoder(nn.Module):
    """The model's own modules around a static KV cache held in buffers, one pair per attention layer.

    Slots past the current position may hold a previous prompt's values; custom_sdpa reads only
    slots 0..start+T-1, so a new prompt can start again at position 0 without clearing the cache.
    """

    def __init__(self, model, max_seq_len: int):
        super().__init__()
        load_llm_kernels()
        self.model = model
        self.max_seq_len = int(max_seq_len)
        config = model.config
        self.cache_names: list[tuple[str, str] | None] = []
        cache_index = 0
        for layer in model.model.layers:
            if layer.self_attn is None:
                self.cache_names.append(None)
                continue
            shape = (1, self.max_seq_len, layer.self_attn.num_kv_heads, config.head_dim)
            names = (f"k_cache_{cache_index}", f"v_cache_{cache_index}")
            for name in names:
                self.register_buffer(name, torch.zeros(shape), persistent=False)
            self.cache_names.append(names)
            cache_index += 1

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        inner = self.model.model
        start = input_pos[0].item()
        torch._check_is_size(start)
        torch._check(start + tokens.shape[1] <= self.max_seq_len)
        hidden = inner.embed_tokens(tokens)
        cos, sin = inner.rotary_emb(hidden, input_pos[None, :])
        for layer, names in zip(inner.layers, self.cache_names):
            if names is not None:
                attn = layer.self_attn
                q, k, v = attn.project_qkv(layer.input_layernorm(hidden), cos, sin, heads_first=False)
                k_cache, v_cache = getattr(self, names[0]), getattr(self, names[1])
                torch.ops.llama.update_cache(k, k_cache, start)
                torch.ops.llama.update_cache(v, v_cache, start)
                out = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0.0, True, attn.scaling)
                hidden = hidden + attn.o_proj(out.flatten(2))
            if layer.mlp is not None:
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.model.lm_head(inner.norm(hidden[:, -1:]))


def runner_metadata(config, max_seq_len: int) -> dict:
    """The constant methods ExecuTorch's LLM runner reads (get_max_seq_len is the one it requires)."""
    eos = eos_ids(config)
    bos = config.bos_token_id if config.bos_token_id is not None else (eos[0] if eos else 0)
    return {
        "get_max_seq_len": int(max_seq_len),
        "get_max_context_len": int(max_seq_len),
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
        "get_eos_ids": eos,
        "get_bos_id": int(bos),
        "get_vocab_size": int(config.vocab_size),
    }


def quantize_8da4w_(
    module: nn.Module,
    group_size: int = DEFAULT_GROUP_SIZE,
    grams: dict[str, torch.Tensor] | None = None,
    int8_projections: tuple[str, ...] = INT8_PROJECTIONS,
) -> dict[str, str]:
    """Quantize every nn.Linear in place (8da4w); returns {linear name: "int4 group G" or "int8 per-channel"}.

    Per-channel int8 where in_features % group_size != 0 (the int4 group kernels need whole groups), for
    the output projection (lm_head: on SmolLM2-135M it alone cost +11% perplexity at 4 bits, +0.2% at 8),
    and for the projections named in ``int8_projections`` (names ending so; see INT8_PROJECTIONS). The
    int4 scales are weight_quant.py's weighted-error search (symmetric, as XNNPACK's 4-bit groups have no
    zero point, with scales rounded to bfloat16 as XNNPACK stores them) and the codes GPTQ on them,
    calibrated by ``grams`` ({linear name: E[x x^T] of its input}) where given.
    """
    from torchao.quantization import quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig

    from .weight_quant import quantize_blocks

    def config(weight_dtype, granularity):
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=weight_dtype, weight_granularity=granularity)

    output = module.get_output_embeddings()
    plan = {
        name: (
            "grouped"
            if m.in_features % group_size == 0 and m is not output and not name.endswith(int8_projections)
            else "per-channel"
        )
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear)
    }
    grouped = {n for n, kind in plan.items() if kind == "grouped"}
    per_channel = {n for n, kind in plan.items() if kind == "per-channel"}
    searched = {}
    for name in grouped:  # from the fp32 weights, before quantize_ replaces them
        weight = module.get_submodule(name).weight
        searched[name] = quantize_blocks(weight, 4, group_size, True, (grams or {}).get(name), torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if grouped:
            quantize_(module, config(torch.int4, PerGroup(group_size)), filter_fn=lambda m, fqn: fqn in grouped)
        if per_channel:
            quantize_(module, config(torch.int8, PerAxis(0)), filter_fn=lambda m, fqn: fqn in per_channel)
    for name, quant in searched.items():
        weight = module.get_submodule(name).weight  # torchao's IntxUnpackedToInt8Tensor: codes -8..7, scales
        weight.qdata.copy_(quant.codes.reshape(weight.qdata.shape))
        weight.scale.copy_(quant.scales.reshape(weight.scale.shape))
    return {n: (f"int4 group {group_size}" if kind == "grouped" else "int8 per-channel") for n, kind in plan.items()}


def quantize_embedding_(module: nn.Module) -> str:
    """Quantize the token embedding in place: int8 with a scale per row (one token's vector).

    Left in fp32, the table the lookup reads is the largest tensor of a small model (a tied one also
    keeps the lm_head's packed copy inside XNNPACK): 8da4w's file and memory would be mostly fp32
    embedding. 8 bits, not 4: the tied table is the output projection's too, and real models lose
    accuracy there first. The lookup reads one row per token, so this saves memory, not decode time.
    ExecuTorch runs it as quantized_decomposed::embedding_byte (see fuse_quantized_embedding).
    Returns the scheme used.
    """
    from torchao.quantization import quantize_
    from torchao.quantization.granularity import PerAxis
    from torchao.quantization.quant_api import IntxWeightOnlyConfig

    embedding = module.get_input_embeddings()
    config = IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    embedding.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)  # untie from lm_head
    embedding.padding_idx = None  # only gradients read it; with it set the export does not match the fused kernel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(module, config, filter_fn=lambda m, fqn: m is embedding)
    return "int8 per-row"


def fuse_quantized_embedding(edge):
    """Replace torchao's dequantize + embedding by ExecuTorch's quantized embedding kernel (packed weights)."""
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass
    from executorch.exir.passes.quant_fusion_pass import QuantFusionPass, _get_node_value_dict

    edge = edge.transform(
        [QuantFusionPass(_fix_node_meta_val=True, node_value_dict=_get_node_value_dict(edge.exported_program()))]
    )
    constant_prop_pass(edge.exported_program())
    return edge


def export_executorch(
    model,
    out_dir: str | Path,
    max_seq_len: int,
    quantize: str | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    model_dir: str | Path | None = None,
    grams: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write out_dir/model.pte (XNNPACK-lowered; 8da4w when quantize == "8da4w") and tokenizer.json.

    The caller's model keeps its weights (quantization works on a copy); it is left in eval mode, fp32.
    grams: {linear name: E[x x^T] of its input} to calibrate 8da4w's grid and codes (optional).
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from torch.export import Dim, export

    if quantize not in (None, "8da4w"):
        raise ValueError(f"unknown ExecuTorch quantization {quantize!r}; use 8da4w or none")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if quantize == "8da4w":
        model = copy.deepcopy(model)  # quantize_ swaps weights in place; the caller keeps its fp32 model
    model = model.float().eval().requires_grad_(False)
    if quantize == "8da4w":
        quantize_8da4w_(model, group_size, grams)
        quantize_embedding_(model)
    decoder = ExecuTorchDecoder(model, max_seq_len).eval()
    # One Dim shared by tokens' length and input_pos' length: prefill any length, decode one token.
    seq = Dim("seq_len", min=1, max=max_seq_len - 1)
    example = (torch.zeros(1, 4, dtype=torch.long), torch.arange(4))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = export(decoder, example, dynamic_shapes=({1: seq}, {0: seq}), strict=False)
        edge = to_edge_transform_and_lower(
            program,
            partitioner=[XnnpackPartitioner()],
            constant_methods=runner_metadata(model.config, max_seq_len),
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )
        if quantize == "8da4w":
            edge = fuse_quantized_embedding(edge)
        lowered = edge.to_executorch()
    path = out_dir / PTE_FILE
    path.write_bytes(lowered.buffer)
    if model_dir is not None and (Path(model_dir) / "tokenizer.json").is_file():
        (out_dir / "tokenizer.json").write_bytes((Path(model_dir) / "tokenizer.json").read_bytes())
    return path
