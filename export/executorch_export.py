"""ExecuTorch export: a .pte with per-layer KV-cache buffers that ExecuTorch's LLM runner can drive.

The program (see ../shared/DESIGN.md, "ExecuTorch format"):
    forward(tokens int64[1, T], input_pos int64[T]) -> logits float[1, T, vocab]
Each attention layer owns two buffers [1, kv_heads_i, max_seq_len, head_dim] that forward updates
in place at input_pos, so layers keep their own KV-head counts. The constant methods below are what
TextLLMRunner (and Android's LlmModule, which wraps it) read to decide how to call forward.

8da4w: int8 dynamic activations, int4 weights in groups of ``group_size`` input channels. A linear
whose input width is not a multiple of the group size (pruning leaves widths like 17) falls back to
per-channel weights. Those are int8, not int4: XNNPACK in executorch 1.5.1 delegates int4 only as
groups whose size is a multiple of 32 (a per-channel int4 weight reaches it as one group of
in_features and is refused), while int8 per-channel weights (qc8w) run there on every width.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from .onnx_export import eos_ids

PTE_FILE = "model.pte"
DEFAULT_GROUP_SIZE = 32


class ExecuTorchDecoder(nn.Module):
    """The model's own modules around a static KV cache held in buffers, one pair per attention layer.

    Slots past the current position hold stale or zero values; the mask hides them, so a new
    prompt can start again at position 0 without clearing the cache.
    """

    def __init__(self, model, max_seq_len: int):
        super().__init__()
        self.model = model
        self.max_seq_len = int(max_seq_len)
        config = model.config
        self.cache_names: list[tuple[str, str] | None] = []
        cache_index = 0
        for layer in model.model.layers:
            if layer.self_attn is None:
                self.cache_names.append(None)
                continue
            shape = (1, layer.self_attn.num_kv_heads, self.max_seq_len, config.head_dim)
            names = (f"k_cache_{cache_index}", f"v_cache_{cache_index}")
            for name in names:
                self.register_buffer(name, torch.zeros(shape), persistent=False)
            self.cache_names.append(names)
            cache_index += 1

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        inner = self.model.model
        hidden = inner.embed_tokens(tokens)
        cos, sin = inner.rotary_emb(hidden, input_pos[None, :])
        slots = torch.arange(self.max_seq_len, device=tokens.device)
        mask = (slots[None, :] <= input_pos[:, None])[None, None]  # [1, 1, T, max_seq_len]
        for layer, names in zip(inner.layers, self.cache_names):
            if names is not None:
                q, k, v = layer.self_attn.project_qkv(layer.input_layernorm(hidden), cos, sin)
                k_cache, v_cache = getattr(self, names[0]), getattr(self, names[1])
                k_cache.index_copy_(2, input_pos, k)
                v_cache.index_copy_(2, input_pos, v)
                hidden = hidden + layer.self_attn.attend(q, k_cache, v_cache, mask)
            if layer.mlp is not None:
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.model.lm_head(inner.norm(hidden))


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


def quantize_8da4w_(module: nn.Module, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, str]:
    """Quantize every nn.Linear in place (8da4w); returns {linear name: "int4 group G" or "int8 per-channel"}.

    Per-channel where in_features % group_size != 0: the int4 group kernels need whole groups.
    """
    from torchao.quantization import quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig

    def config(weight_dtype, granularity):
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=weight_dtype, weight_granularity=granularity, intx_choose_qparams_algorithm="hqq_scale_only"
        )

    plan = {
        name: ("grouped" if m.in_features % group_size == 0 else "per-channel")
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear)
    }
    grouped = {n for n, kind in plan.items() if kind == "grouped"}
    per_channel = {n for n, kind in plan.items() if kind == "per-channel"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if grouped:
            quantize_(module, config(torch.int4, PerGroup(group_size)), filter_fn=lambda m, fqn: fqn in grouped)
        if per_channel:
            quantize_(module, config(torch.int8, PerAxis(0)), filter_fn=lambda m, fqn: fqn in per_channel)
    return {n: (f"int4 group {group_size}" if kind == "grouped" else "int8 per-channel") for n, kind in plan.items()}


def export_executorch(
    model,
    out_dir: str | Path,
    max_seq_len: int,
    quantize: str | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    model_dir: str | Path | None = None,
) -> Path:
    """Write out_dir/model.pte (XNNPACK-lowered; 8da4w when quantize == "8da4w") and tokenizer.json.

    The caller's model keeps its weights (quantization works on a copy); it is left in eval mode, fp32.
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
        quantize_8da4w_(model, group_size)
    decoder = ExecuTorchDecoder(model, max_seq_len).eval()
    # One Dim shared by tokens' length and input_pos' length: prefill any length, decode one token.
    seq = Dim("seq_len", min=1, max=max_seq_len - 1)
    example = (torch.zeros(1, 4, dtype=torch.long), torch.arange(4))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = export(decoder, example, dynamic_shapes=({1: seq}, {0: seq}), strict=False)
        lowered = to_edge_transform_and_lower(
            program,
            partitioner=[XnnpackPartitioner()],
            constant_methods=runner_metadata(model.config, max_seq_len),
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        ).to_executorch()
    path = out_dir / PTE_FILE
    path.write_bytes(lowered.buffer)
    if model_dir is not None and (Path(model_dir) / "tokenizer.json").is_file():
        (out_dir / "tokenizer.json").write_bytes((Path(model_dir) / "tokenizer.json").read_bytes())
    return path
