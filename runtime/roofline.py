"""The decode roofline: decoding one token reads every weight once, so it cannot beat

    roofline tok/s = memory bandwidth / bytes of weights read per token

Bytes per token: every weight tensor, except an embedding table that is only gathered from (one row
is read); a tied embedding is read in full by the output projection. For ONNX files this is read off
the graph; for the torch model off model.safetensors (run as float32); for .pte files it is estimated
from the model's config.json (found beside the export) and the quantization (8da4w: int4 + a bf16
scale per group of 32, int8 per-channel where the width is not a multiple of 32). KV-cache reads are
left out (small at these lengths). The bandwidth is machine.py's measurement.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .backend import read_json
from .bench_targets import Target
from .model_files import FORMAT_OF_BACKEND

INT4_GROUP = 32


ONNX_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2, 21: 1, 22: 1}


def onnx_bytes_per_token(model_file: Path) -> int:
    """Bytes of initializers one decode step reads; gather-only tables (embeddings) count one row."""
    import onnx

    model = onnx.load(str(model_file), load_external_data=False)
    graph = model.graph
    uses: dict[str, list[tuple[str, int]]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            uses.setdefault(name, []).append((node.op_type, slot))
    total = 0
    for init in graph.initializer:
        numel = int(np.prod(init.dims)) if len(init.dims) else 1
        nbytes = numel * ONNX_ITEMSIZE.get(init.data_type, 4)
        if init.data_type in (21, 22):  # uint4 / int4: two per byte
            nbytes = (numel + 1) // 2
        consumers = uses.get(init.name, [])
        if consumers and all(op == "Gather" and slot == 0 for op, slot in consumers) and init.dims:
            nbytes = nbytes // max(int(init.dims[0]), 1)
        total += nbytes
    return total


def safetensors_bytes_per_token(model_dir: Path) -> int | None:
    """float32 bytes of the model's weights read per token, from model.safetensors headers."""
    shapes: dict[str, list[int]] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    for path in files:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    total = 0
    tied = not any(k.endswith("lm_head.weight") for k in shapes)
    for name, shape in shapes.items():
        numel = int(np.prod(shape)) if shape else 1
        if name.endswith("embed_tokens.weight") and not tied and shape:
            numel //= shape[0]
        total += numel * 4
    return total


def pte_bytes_per_token(config_path: Path, quantization: str, group: int = INT4_GROUP) -> int | None:
    """Estimated bytes per token of a .pte from the model's config (fp32, or 8da4w's int4/int8 weights)."""
    config = read_json(config_path)
    if not config:
        return None
    d, vocab = int(config["hidden_size"]), int(config["vocab_size"])
    head_dim = int(config.get("head_dim") or d // int(config["num_attention_heads"]))
    layers = int(config["num_hidden_layers"])
    per_layer = config.get("per_layer_config") or {}
    if isinstance(per_layer, list):
        per_layer = dict(enumerate(per_layer))
    per_layer = {int(k): v for k, v in per_layer.items()}  # keys are written as "00", "01", ...

    def layer_value(i: int, key: str) -> int:
        return int((per_layer.get(i) or {}).get(key, config[key]))

    linears = [(d, vocab)]  # (in, out): the output projection
    norms = d
    for i in range(layers):
        heads, kv, ffn = (
            layer_value(i, k) for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size")
        )
        if heads:
            linears += [(d, heads * head_dim), (d, kv * head_dim), (d, kv * head_dim), (heads * head_dim, d)]
            norms += d
        if ffn:
            linears += [(d, ffn), (d, ffn), (ffn, d)]
            norms += d

    def linear_bytes(n_in: int, n_out: int) -> float:
        if quantization == "fp32":
            return 4.0 * n_in * n_out
        if n_in % group == 0:  # int4 in groups, a bf16 scale per group
            return n_in * n_out * (0.5 + 2.0 / group)
        return n_in * n_out + 4.0 * n_out  # int8 per output channel, an fp32 scale per channel

    if quantization not in ("fp32", "8da4w"):
        return None
    return int(sum(linear_bytes(i, o) for i, o in linears) + 4 * (norms + d))  # + one embedding row


def weights_per_token(target: Target) -> tuple[int | None, str]:
    """(bytes of weights one decode step reads, how they were found)."""
    path = Path(target.path)
    try:
        if target.backend == "torch":
            return safetensors_bytes_per_token(path), "model.safetensors as float32"
        if FORMAT_OF_BACKEND[target.backend] == "onnx":
            return onnx_bytes_per_token(path / "model.onnx"), "ONNX initializers"
        if FORMAT_OF_BACKEND[target.backend] == "gguf":
            return gguf_bytes_per_token(path / "model.gguf" if path.is_dir() else path), "GGUF tensors"
        if target.config_path:
            return pte_bytes_per_token(Path(target.config_path), target.quantization), "estimated from config.json"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None, "unknown (no config.json found beside the export)"


def gguf_bytes_per_token(model_file: Path) -> int:
    """Bytes of the GGUF's weights one decode step reads: all but the embedding table, of which one row
    (all of it when it is also the output projection: tied embeddings, no output.weight)."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(str(model_file)).tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    embedding = tensors.get("token_embd.weight")
    if embedding is not None and "output.weight" in tensors:
        rows = int(embedding.shape[-1])
        total -= int(embedding.n_bytes) - int(embedding.n_bytes) // rows
    return total


def roofline_tokens_per_s(bandwidth: float | None, bytes_per_token: int | None) -> float | None:
    return bandwidth / bytes_per_token if bandwidth and bytes_per_token else None
