"""Quantized variants of an exported ONNX directory, with onnxruntime.quantization.

    int8: dynamic quantization: int8 weights per output channel, activations quantized at run time
          (MatMulInteger / DynamicQuantizeLinear); runs on every onnxruntime CPU build.
    int4: weight-only int4 in blocks along the input dimension (MatMulNBits), symmetric; the
          activations stay fp32. onnxruntime pads a last partial block, so odd widths such as 17 work.

Each variant is a full onnxruntime-genai directory (its own model.onnx, genai_config.json and
tokenizer files), so it runs as is, exactly like the fp32 one.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from .onnx_export import ONNX_MODEL_FILE

ONNX_QUANTIZATIONS = ("int8", "int4")
DEFAULT_INT4_BLOCK_SIZE = 32


def quantize_onnx_dir(
    src_dir: str | Path, dst_dir: str | Path, method: str, block_size: int = DEFAULT_INT4_BLOCK_SIZE
) -> Path:
    """Write dst_dir: the fp32 directory src_dir with its model.onnx quantized by ``method``."""
    if method not in ONNX_QUANTIZATIONS:
        raise ValueError(f"unknown ONNX quantization {method!r}; use one of {ONNX_QUANTIZATIONS}")
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    for item in src_dir.iterdir():  # genai_config.json and tokenizer files are shared with fp32
        if item.is_file() and not item.name.startswith(ONNX_MODEL_FILE):
            shutil.copyfile(item, dst_dir / item.name)
    src, dst = src_dir / ONNX_MODEL_FILE, dst_dir / ONNX_MODEL_FILE
    external = (src_dir / (ONNX_MODEL_FILE + ".data")).exists()
    quiet = logging.getLogger().level
    # The quantizers log through the root logger: every node at INFO, and a generic advice to
    # run shape-inference pre-processing at WARNING (not needed: the exporter writes all shapes).
    logging.getLogger().setLevel(logging.ERROR)
    try:
        if method == "int8":
            quantize_int8_dynamic(src, dst, external)
        else:
            quantize_int4_weight_only(src, dst, external, block_size)
    finally:
        logging.getLogger().setLevel(quiet)
    return dst


def fold_transposed_weights(model) -> dict[str, str]:
    """Replace Transpose(initializer) -> MatMul by a MatMul on a pre-transposed initializer.

    A tied lm_head is exported as Transpose(embedding weight) feeding MatMul, and the quantizers
    only quantize MatMuls whose weight is an initializer; without this fold the largest matrix of
    a small model would stay fp32. The embedding keeps its fp32 table here (its Gather still reads
    it; int4 then shares the quantized one, see share_tied_embedding).
    Returns {the new transposed initializer: the initializer it was transposed from}.
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


def quantize_int8_dynamic(src: Path, dst: Path, external_data: bool) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    fold_transposed_weights(model)

    # MatMul only: the embedding Gather stays fp32 (a lookup, no compute to save, and quantizing it
    # costs accuracy on every token); per_channel keeps each output row's own scale.
    quantize_dynamic(
        model,
        dst,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        use_external_data_format=external_data,
        extra_options={"MatMulConstBOnly": True},
    )


def quantize_int4_weight_only(src: Path, dst: Path, external_data: bool, block_size: int) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    folded = fold_transposed_weights(model)
    # accuracy_level 4: int8 compute inside MatMulNBits where the CPU supports it (fast path),
    # which onnxruntime documents as the recommended CPU setting for int4 LLMs.
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    share_tied_embedding(quantizer.model.model, folded, block_size)
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=external_data)


def share_tied_embedding(model, folded: dict[str, str], block_size: int) -> bool:
    """One int4 copy of a tied embedding: the token lookup reads the lm_head's MatMulNBits weight.

    After quantization a tied model holds its embedding twice: the fp32 table the Gather reads
    (vocab x hidden x 4 bytes, the largest tensor of a small model) and the int4 lm_head. The
    Gather becomes GatherBlockQuantized on the very same packed initializer, viewed as [vocab,
    blocks, bytes per block] and dequantized per block with the lm_head's scales (its implicit zero
    point, 8, is MatMulNBits' symmetric one), then reshaped to [batch, seq, hidden]; the fp32 table
    goes. So the file and the memory follow the quantized weights. Embeddings now carry int4 error
    too, which effllm-export's verification measures. Hidden sizes that are not a multiple of the
    block keep the fp32 table (the packed rows then carry padding). Returns whether it shared.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) < 3:
            continue
        source = next((src for folded_name, src in folded.items() if node.input[1] == f"{folded_name}_Q4"), None)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        gathers = [
            g
            for g in graph.node
            if g.op_type == "Gather" and g.input[0] == source and not any(a.i for a in g.attribute if a.name == "axis")
        ]
        if source is None or not gathers or attrs["K"] % block_size or attrs.get("bits", 4) != 4:
            continue
        if any(n.input[0] == source for n in graph.node if n not in gathers) or len(node.input) > 3 and node.input[3]:
            continue  # the fp32 table has other readers, or zero points are stored: keep it as it is
        vocab, blocks = attrs["N"], attrs["K"] // block_size
        scales = numpy_helper.to_array(initializers[node.input[2]]).reshape(vocab, blocks, 1)
        scales_name = f"{node.input[2]}_gather"
        graph.initializer.append(numpy_helper.from_array(scales, name=scales_name))
        shape_name = f"{source}_hidden_shape"
        graph.initializer.append(numpy_helper.from_array(np.array([0, 0, attrs["K"]], dtype=np.int64), shape_name))
        for gather in gathers:
            blocked = f"{gather.output[0]}_blocks"
            position = list(graph.node).index(gather)
            graph.node.remove(gather)
            graph.node.insert(
                position,
                helper.make_node(
                    "GatherBlockQuantized",
                    [node.input[1], gather.input[1], scales_name],
                    [blocked],
                    name=f"{gather.name}_int4",
                    domain="com.microsoft",
                    bits=4,
                    block_size=block_size,
                    gather_axis=0,
                    quantize_axis=2,
                ),
            )
            graph.node.insert(
                position + 1,
                helper.make_node("Reshape", [blocked, shape_name], [gather.output[0]], name=f"{gather.name}_hidden"),
            )
        graph.initializer.remove(initializers[source])
        return True
    return False
