"""The decode roofline: decoding one token reads every weight once, so it cannot beat

    roofline tok/s = memory bandwidth / bytes of weights read per token

Bytes per token: every weight tensor, except an embedding table that is only gathered from (one row
is read); a tied embedding is read in full by the output projection. For ONNX files this is read off
the graph; for the torch model off model.safetensors (run as float32); for .pte files off the program
(whatever each projection's precision: 8da4w mixes int4 groups and int8 channels). KV-cache reads are
left out (small at these lengths). The bandwidth is machine.py's measurement.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .bench_targets import Target
from .model_files import FORMAT_OF_BACKEND

# ExecuTorch kernels that read one row of a table per token id (fp32, and 8da4w's int8 rows with their scales)
PTE_GATHER_OPS = {"aten::embedding", "quantized_decomposed::embedding_byte"}


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


def pte_bytes_per_token(pte_file: Path) -> int:
    """Bytes of a .pte's weights one decode step reads: XNNPACK's weights (the file's named data) and the
    program's constants, less the tables only embedding kernels read, of which one row (a row per token id).

    A tied embedding's output projection is XNNPACK's own copy of the table, so it still counts in full.
    """
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary(Path(pte_file).read_bytes())
    program = pte.program
    forward = next(plan for plan in program.execution_plan if plan.name == "forward")
    readers: dict[int, set[str]] = {}  # value index -> the kernels (or delegate calls) that take it
    for chain in forward.chains:
        for instruction in chain.instructions:
            call = instruction.instr_args
            name = forward.operators[call.op_index].name if hasattr(call, "op_index") else type(call).__name__
            for index in getattr(call, "args", ()):
                readers.setdefault(index, set()).add(name)
    total = sum(len(buffer) for buffer in pte.named_data.buffers) if pte.named_data else 0
    total += sum(len(buffer.storage) for buffer in program.constant_buffer)
    for index, value in enumerate(forward.values):
        tensor = value.val
        if getattr(tensor, "data_buffer_idx", 0) > 0 and tensor.sizes and readers.get(index, {""}) <= PTE_GATHER_OPS:
            nbytes = len(program.constant_buffer[tensor.data_buffer_idx].storage)
            total -= nbytes - nbytes // tensor.sizes[0]
    return total


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
        if FORMAT_OF_BACKEND[target.backend] == "pte":
            return pte_bytes_per_token(path / "model.pte" if path.is_dir() else path), "the .pte program's weights"
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        pass
    return None, "unknown (the file could not be read)"


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
