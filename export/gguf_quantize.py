"""Quantized GGUF variants, made by llama.cpp's own quantizer (llama_model_quantize), and what it did per tensor.

llama.cpp quantizes a weight in blocks along its rows (a row = one output channel's input weights): 32 values
for Q8_0 / Q4_0, 256 for the K-quants. A row whose length is not a multiple of the block cannot be stored in
that type, and llama.cpp keeps the tensor in another one (a fallback: F16 for Q8_0/Q4_0, Q5_0/Q8_0/F16 for the
K-quants). Pruning leaves such widths (an FFN of 309 channels makes ffn_down rows of 309); `effllm-train
--granularity 32` keeps every width a multiple of 32, and then nothing falls back for q8_0/q4_0. The K-quant
mixes (q4_k_m) also keep some tensors at higher precision on purpose (Q6_K for half of attn_v / ffn_down), and
every type keeps the output projection (token_embd when embeddings are tied) at Q6_K or Q8_0.
:func:`quantization_fallbacks` reads the written file back with gguf.GGUFReader and lists every weight that is
not in the variant's own type, with the reason; verify.md shows the list.

Given calibration (the exporter's E[x x^T] per Linear), the Q4_0 and Q5_0 tensors' codes are then rewritten in
place by GPTQ (:func:`rewrite_block_codes`): same file, same types, same llama.cpp kernels, less error.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from .gguf_export import GGUF_FILE

# method -> (llama.cpp's file type, the tensor type it stands for)
GGUF_QUANTIZATIONS = {
    "q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", "Q8_0"),
    "q4_0": ("LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_0"),
    "q4_k_m": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K"),
}


# a Linear's name in effllm's model -> its tensor in llama.cpp's file ({} = the layer)
GGUF_TENSOR_NAMES = {
    "self_attn.q_proj": "blk.{}.attn_q.weight",
    "self_attn.k_proj": "blk.{}.attn_k.weight",
    "self_attn.v_proj": "blk.{}.attn_v.weight",
    "self_attn.o_proj": "blk.{}.attn_output.weight",
    "mlp.gate_proj": "blk.{}.ffn_gate.weight",
    "mlp.up_proj": "blk.{}.ffn_up.weight",
    "mlp.down_proj": "blk.{}.ffn_down.weight",
}


def gguf_tensor_name(linear: str) -> str | None:
    """The GGUF tensor of an effllm Linear ("model.layers.3.mlp.up_proj" -> "blk.3.ffn_up.weight"), else None."""
    if linear == "lm_head":
        return "output.weight"
    parts = linear.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in GGUF_TENSOR_NAMES:
        return GGUF_TENSOR_NAMES[".".join(parts[3:])].format(parts[2])
    return None


def gguf_importance(importance: dict) -> dict[str, np.ndarray]:
    """effllm's importance table ({Linear name: mean squared input per channel}) under llama.cpp's tensor
    names: what llama.cpp's imatrix tool computes (it too stores the mean of squared inputs per channel)."""
    return {
        gguf_tensor_name(name): np.ascontiguousarray(values.detach().float().numpy(), dtype=np.float32)
        for name, values in importance.items()
        if gguf_tensor_name(name) is not None
    }


def quantize_gguf(
    src_dir: Path,
    out_dir: Path,
    method: str,
    threads: int | None = None,
    importance: dict | None = None,
    model=None,
    grams: dict | None = None,
) -> Path:
    """OUT_DIR/model.gguf quantized from SRC_DIR/model.gguf by llama.cpp (+ SRC_DIR's tokenizer files).

    importance: {Linear name: mean squared input per channel} handed to llama.cpp's quantizer as its
    importance matrix (its k-quants and q4_0 then weigh each weight's error by its input's energy).
    model and grams ({Linear name: E[x x^T]}): Q4_0 and Q5_0 codes then come from GPTQ (rewrite_block_codes).
    """
    from effllm.runtime.llamacpp_backend import clear_errors, first_error, llama_api

    from .onnx_export import copy_tokenizer_files

    api = llama_api()
    out_dir.mkdir(parents=True, exist_ok=True)
    src, dst = src_dir / GGUF_FILE, out_dir / GGUF_FILE
    params = api.llama_model_quantize_default_params()
    params.ftype = getattr(api, GGUF_QUANTIZATIONS[method][0])
    params.nthread = int(threads or os.cpu_count() or 1)
    if importance:
        # a null-terminated array of (tensor name, values, count); `keep` holds the buffers during the call
        keep = gguf_importance(importance)
        entries = (api.llama_model_imatrix_data * (len(keep) + 1))()
        for entry, (name, values) in zip(entries, keep.items()):
            entry.name = name.encode()
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
        params.imatrix = entries
    clear_errors()
    code = api.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if code != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {method} (code {code}): {first_error()}")
    if model is not None and grams:
        rewrite_block_codes(dst, model, grams)
    copy_tokenizer_files(src_dir, out_dir)
    return dst


def gguf_linears(model) -> dict[str, tuple[str, int | None]]:
    """{GGUF tensor name: (effllm Linear name, heads whose q/k rows the file interleaves, else None)} for
    every Linear of ``model`` (stand-in blocks have none: they stay as llama.cpp wrote them)."""
    out = {}
    for name, _ in model.named_modules():
        tensor = gguf_tensor_name(name)
        if tensor is None:
            continue
        if name == "lm_head":  # tied: token_embd is the output projection, an embedding with no gram
            if not model.config.tie_word_embeddings:
                out[tensor] = (name, None)
            continue
        attn = model.model.layers[int(name.split(".")[2])].self_attn
        heads = {"q_proj": attn.num_heads, "k_proj": attn.num_kv_heads}.get(name.split(".")[-1]) if attn else None
        out[tensor] = (name, heads)
    return out


# llama.cpp's block types whose values are d * (q - 2^(bits-1)): one f16 scale per 32 values, no minimum;
# weight_quant's symmetric codes, shifted. q4_0 is all Q4_0; q4_k_m falls back to Q5_0 for rows that are not
# whole 256-value K-quant blocks (every row of a 576-wide model).
SYMMETRIC_BLOCK_BITS = {"Q4_0": 4, "Q5_0": 5}


def rewrite_block_codes(path: Path, model, grams: dict) -> int:
    """Replace the codes and scales of every Q4_0 and Q5_0 tensor in ``path`` (in place, same type and size) by
    weight_quant's: the scale search and GPTQ on E[x x^T] of each Linear's input (``grams``).

    llama.cpp's quantizer takes an importance matrix but rounds every weight on its own; GPTQ pushes each
    rounding error onto the weights not yet rounded, so the layer's output error is what shrinks: on the
    0.7-pruned SmolLM2-135M (dithered; 8,192 held-out tokens) q4_0 cost +9.5% perplexity (top-1 0.781) with
    llama.cpp's codes and its importance matrix, +4.1% (top-1 0.869) with these. Returns the number of tensors
    rewritten; other types (Q8_0, the K-quants, F16) stay as llama.cpp wrote them.
    """
    import gguf
    import torch

    from .gguf_export import rope_rows_to_interleaved
    from .weight_quant import quantize_blocks

    linears = gguf_linears(model)
    reader = gguf.GGUFReader(str(path), "r+")
    rewritten = 0
    for tensor in reader.tensors:
        bits = SYMMETRIC_BLOCK_BITS.get(tensor.tensor_type.name)
        if bits is None or tensor.name not in linears or linears[tensor.name][0] not in grams:
            continue
        name, heads = linears[tensor.name]
        weight = model.get_submodule(name).weight.detach().float()
        if heads:
            weight = torch.from_numpy(rope_rows_to_interleaved(weight.numpy(), heads))  # as the file's rows
        block = gguf.GGML_QUANT_SIZES[tensor.tensor_type][0]
        quant = quantize_blocks(weight, bits, block, True, grams[name], torch.float16)
        tensor.data.reshape(-1)[:] = symmetric_blocks(quant).reshape(-1)
        rewritten += 1
    reader.data.flush()
    return rewritten


def symmetric_blocks(quant) -> np.ndarray:
    """weight_quant's symmetric blocks of 32 as llama.cpp's block_q4_0 / block_q5_0 array [rows, blocks, bytes]:
    the f16 scale, (Q5_0) the 32 fifth bits as a little-endian uint32, then 16 bytes of low nibbles (values
    0-15 in the low halves, 16-31 in the high halves)."""
    unsigned = (quant.codes + 2 ** (quant.bits - 1)).numpy().astype(np.uint8)  # [rows, blocks, 32]
    low = unsigned & 0x0F
    parts = [quant.scales.numpy().astype(np.float16)[..., None].view(np.uint8)]
    if quant.bits == 5:
        parts.append(np.packbits(unsigned >> 4, axis=-1, bitorder="little"))
    parts.append(low[..., :16] | (low[..., 16:] << 4))
    return np.concatenate(parts, axis=-1)


def tensor_types(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (GGML type, shape as GGUF stores it: row length first) of every tensor in a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, [int(x) for x in t.shape]) for t in reader.tensors}


def quantization_fallbacks(path: Path, method: str) -> list[dict]:
    """Every weight matrix of a quantized GGUF that is not in the method's own type, and why."""
    import gguf

    target = GGUF_QUANTIZATIONS[method][1]
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[target]][0]
    out = []
    for name, (kind, shape) in tensor_types(Path(path)).items():
        if len(shape) < 2 or kind == target:  # norm weights are always F32
            continue
        row = shape[0]
        if row % block:
            reason = f"row length {row} is not a multiple of {target}'s block of {block}"
        elif name in ("output.weight", "token_embd.weight"):  # token_embd is the output projection when tied
            reason = "llama.cpp keeps the output projection at higher precision"
        else:
            reason = f"llama.cpp's {method.upper()} mix keeps it at higher precision"
        out.append({"tensor": name, "type": kind, "row_length": row, "reason": reason})
    return out
