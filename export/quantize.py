"""Quantized variants of an exported ONNX directory: weight-only MatMulNBits with effllm's codes.

    int8: every matrix multiply as MatMulNBits with 8-bit weights in blocks of ``block_size`` input
          channels (a scale and a zero point per block);
    int4: the same with 4-bit weights, except the output projection (the tied embedding / lm_head),
          which stays at 8 bits: on SmolLM2-135M it alone moved perplexity by +11% at 4 bits and +0.2% at 8;
          and the FFN's down_proj (EIGHT_BIT_PROJECTIONS), also 8 bits: on the 0.7-pruned SmolLM2 (8,192
          held-out tokens) int4 cost +5.65% perplexity (top-1 0.853) with it at 4 bits, +3.33% (0.881) at 8,
          for a file 9% larger (76 -> 83 MiB); o_proj at 8 bits as well gained only 0.2 points more.
The grid comes from weight_quant.py's weighted-error search and int4's codes from GPTQ on that grid
(calibrated on held-out text when the exporter passes the inputs' second moments, else every input
channel counts alike and the codes round to nearest), not from onnxruntime's round-to-nearest
quantizer: on SmolLM2-135M (dithered) int4's perplexity increase went from +27% to +11.5% (search) and
+1.7% (search and GPTQ).
MatMulNBits runs with accuracy_level 4 (the activations enter as int8 per block inside the kernel: onnxruntime's recommended
CPU setting for quantized LLMs, 1.3-1.6x faster decode than fp32 compute). The former int8 variant,
MatMulInteger with one dynamic scale for a whole activation tensor, cost +83% perplexity on SmolLM2-135M:
a real model's outlier channels take the whole tensor's int8 range.

A tied embedding's lookup then reads the output projection's own quantized weight (GatherBlockQuantized)
and its fp32 table goes, so the file and the memory follow the quantized weights.

Each variant is a full onnxruntime-genai directory (its own model.onnx, genai_config.json and tokenizer
files), so it runs as is, exactly like the fp32 one.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import torch

from .onnx_export import ONNX_MODEL_FILE
from .weight_quant import BlockQuant, quantize_blocks

ONNX_QUANTIZATIONS = ("int8", "int4")
DEFAULT_BLOCK_SIZE = 32
ACCURACY_LEVEL = 4
# Projections int4 keeps at 8 bits (as llama.cpp's q4_k_m keeps ffn_down higher; q/k/v and gate/up are fused
# in the graph, so v_proj cannot be singled out here as 8da4w does).
EIGHT_BIT_PROJECTIONS = ("mlp.down_proj",)


def weight_key(weight_t: np.ndarray) -> str:
    """Identifies a MatMul weight ([in, out], as the graph holds it) by its values."""
    return hashlib.sha1(np.ascontiguousarray(weight_t, dtype=np.float32).tobytes()).hexdigest()


def grams_by_weight(model, grams: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{weight_key of every matrix the ONNX graph may hold: E[x x^T] of its input}.

    The exporter fuses q/k/v and gate/up (fused_linears.py); fused weights share their input, so the
    first projection's matrix serves them all. Keys cover the separate projections too.
    """
    table = {}
    names = {id(mod): name for name, mod in model.named_modules()}
    for block in model.model.layers:
        groups = []
        if block.self_attn is not None:
            a = block.self_attn
            groups += [[a.q_proj, a.k_proj, a.v_proj], [a.q_proj], [a.k_proj], [a.v_proj], [a.o_proj]]
        if block.mlp is not None:
            m = block.mlp
            groups += [[m.gate_proj, m.up_proj], [m.gate_proj], [m.up_proj], [m.down_proj]]
        for linears in groups:
            name = names[id(linears[0])]
            if name in grams:
                weight = torch.cat([lin.weight.detach() for lin in linears]).float()
                table[weight_key(weight.T.numpy())] = grams[name]
    if "lm_head" in grams:
        table[weight_key(model.lm_head.weight.detach().float().T.numpy())] = grams["lm_head"]
    return table


def eight_bit_weights(model, projections: tuple[str, ...] = EIGHT_BIT_PROJECTIONS) -> set[str]:
    """weight_key of every matrix int4 keeps at 8 bits: the Linears whose names end in ``projections``."""
    return {
        weight_key(module.weight.detach().float().T.numpy())
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(projections)
    }


def quantize_onnx_dir(
    src_dir: str | Path,
    dst_dir: str | Path,
    method: str,
    block_size: int = DEFAULT_BLOCK_SIZE,
    grams: dict[str, torch.Tensor] | None = None,
    accuracy_level: int = ACCURACY_LEVEL,
    eight_bit: set[str] | frozenset = frozenset(),
) -> Path:
    """Write dst_dir: the fp32 directory src_dir with its model.onnx quantized by ``method``.

    grams: grams_by_weight's table (None: every input channel counts alike); accuracy_level:
    MatMulNBits' (1: fp32 compute on the dequantized weights, which the tests compare exactly);
    eight_bit: weight_keys of matrices kept at 8 bits in int4 (eight_bit_weights).
    """
    import onnx

    if method not in ONNX_QUANTIZATIONS:
        raise ValueError(f"unknown ONNX quantization {method!r}; use one of {ONNX_QUANTIZATIONS}")
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    for item in src_dir.iterdir():  # genai_config.json and tokenizer files are shared with fp32
        if item.is_file() and not item.name.startswith(ONNX_MODEL_FILE):
            shutil.copyfile(item, dst_dir / item.name)
    model = onnx.load(str(src_dir / ONNX_MODEL_FILE))
    folded = fold_transposed_weights(model)
    bits = 8 if method == "int8" else 4
    output_projection = quantize_matmuls(model, bits, block_size, grams or {}, folded, accuracy_level, eight_bit)
    if output_projection is not None:
        share_tied_embedding(model, *output_projection, block_size)
    external = (src_dir / (ONNX_MODEL_FILE + ".data")).exists()
    dst = dst_dir / ONNX_MODEL_FILE
    onnx.save(model, str(dst), save_as_external_data=external, location=ONNX_MODEL_FILE + ".data")
    return dst


def fold_transposed_weights(model) -> dict[str, str]:
    """Replace Transpose(initializer) -> MatMul by a MatMul on a pre-transposed initializer.

    A tied lm_head is exported as Transpose(embedding weight) feeding MatMul; only MatMuls whose weight
    is an initializer are quantized, and without this fold the largest matrix of a small model would stay
    fp32. Returns {the new transposed initializer: the initializer it was transposed from}.
    """
    from onnx import numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    folded: dict[str, str] = {}
    for node in list(graph.node):
        if node.op_type != "Transpose" or node.input[0] not in initializers:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        users = consumers.get(node.output[0], [])
        if (
            perm not in (None, [1, 0])
            or not users
            or any(u.op_type != "MatMul" or u.input[1] != node.output[0] for u in users)
        ):
            continue
        weight = numpy_helper.to_array(initializers[node.input[0]])
        if weight.ndim != 2:
            continue
        graph.initializer.append(numpy_helper.from_array(weight.T.copy(), name=node.output[0]))
        graph.node.remove(node)
        folded[node.output[0]] = node.input[0]
    return folded


def quantize_matmuls(
    model, bits: int, block_size: int, grams: dict, folded: dict[str, str], accuracy_level: int, eight_bit=frozenset()
):
    """Every MatMul on a 2-D initializer becomes MatMulNBits (``bits``; the output projection and ``eight_bit``'s 8).

    Returns (MatMulNBits node, embedding table name) of a tied output projection, else None.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    logits = {out.name for out in graph.output if out.name == "logits"}
    tied = None
    for node in list(graph.node):
        if node.op_type != "MatMul" or node.input[1] not in initializers:
            continue
        weight_t = numpy_helper.to_array(initializers[node.input[1]])
        if weight_t.ndim != 2:
            continue
        key = weight_key(weight_t)
        is_output = node.output[0] in logits or node.input[1] in folded
        node_bits = 8 if is_output or key in eight_bit else bits
        quant = quantize_blocks(
            torch.from_numpy(weight_t.T.astype(np.float32)), node_bits, block_size, symmetric=False,
            gram=grams.get(key),
        )  # fmt: skip
        name = node.input[1]
        packed, scales, zeros = matmulnbits_arrays(quant)
        graph.initializer.extend(
            [
                numpy_helper.from_array(packed, f"{name}_Q{node_bits}"),
                numpy_helper.from_array(scales, f"{name}_scales"),
                numpy_helper.from_array(zeros, f"{name}_zero_points"),
            ]
        )
        quantized = helper.make_node(
            "MatMulNBits",
            [node.input[0], f"{name}_Q{node_bits}", f"{name}_scales", f"{name}_zero_points"],
            list(node.output),
            name=f"{node.name}_Q{node_bits}",
            domain="com.microsoft",
            K=weight_t.shape[0],
            N=weight_t.shape[1],
            bits=node_bits,
            block_size=block_size,
            accuracy_level=accuracy_level,
        )
        index = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(index, quantized)
        readers[name] -= 1
        if readers[name] == 0:
            graph.initializer.remove(initializers[name])
        if name in folded:
            tied = (quantized, folded[name])
    return tied


def matmulnbits_arrays(quant: BlockQuant) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits' B [N, blocks, block*bits/8] (low nibble first), scales [N, blocks] and zero points
    [N, ceil(blocks*bits/8)] (two 4-bit zero points per byte, the even block in the low nibble)."""
    codes = quant.codes.to(torch.uint8)
    zeros = quant.zero_points.to(torch.uint8)
    if quant.bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
        if zeros.shape[1] % 2:
            zeros = torch.nn.functional.pad(zeros, (0, 1))
        zeros = zeros[:, 0::2] | (zeros[:, 1::2] << 4)
    return codes.numpy(), quant.scales.numpy().astype(np.float32), zeros.numpy()


def share_tied_embedding(model, matmul, table: str, block_size: int) -> None:
    """One 8-bit copy of a tied embedding: the token lookup reads the output projection's MatMulNBits weight.

    After quantization a tied model would hold its embedding twice: the fp32 table the Gather reads
    (vocab x hidden x 4 bytes, the largest tensor of a small model) and the quantized output projection.
    The Gather becomes GatherBlockQuantized on the very same initializers (codes viewed as [vocab, blocks,
    block], scales and zero points as [vocab, blocks, 1]), reshaped to [batch, seq, hidden]; the fp32 table
    goes. Embeddings then carry the 8-bit error too, which effllm-export's verification measures. A table
    with other readers, or a hidden size that is not a multiple of the block (its packed rows carry
    padding), keeps the fp32 table.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in matmul.attribute}
    gathers = [g for g in graph.node if g.op_type == "Gather" and g.input[0] == table
               and not any(a.i for a in g.attribute if a.name == "axis")]  # fmt: skip
    others = [n for n in graph.node if table in n.input and n not in gathers]
    if attrs["bits"] != 8 or attrs["K"] % block_size or not gathers or others or table not in initializers:
        return
    vocab, blocks = attrs["N"], attrs["K"] // block_size
    # 8-bit codes are already [vocab, blocks, block]; scales and zero points get a [vocab, blocks, 1] view
    views = [matmul.input[1]]
    for source in matmul.input[2:4]:
        views.append(f"{source}_gather")
        array = numpy_helper.to_array(initializers[source]).reshape(vocab, blocks, 1)
        graph.initializer.append(numpy_helper.from_array(array, views[-1]))
    shape_name = f"{table}_hidden_shape"
    graph.initializer.append(numpy_helper.from_array(np.array([0, 0, attrs["K"]], dtype=np.int64), shape_name))
    for gather in gathers:
        blocked = f"{gather.output[0]}_blocks"
        position = list(graph.node).index(gather)
        graph.node.remove(gather)
        graph.node.insert(
            position,
            helper.make_node(
                "GatherBlockQuantized",
                [views[0], gather.input[1], views[1], views[2]],
                [blocked],
                name=f"{gather.name}_q8",
                domain="com.microsoft",
                bits=8,
                block_size=block_size,
                gather_axis=0,
                quantize_axis=2,
            ),
        )
        graph.node.insert(
            position + 1,
            helper.make_node("Reshape", [blocked, shape_name], [gather.output[0]], name=f"{gather.name}_hidden"),
        )
    graph.initializer.remove(initializers[table])
