"""effllm's block-wise weight quantization (export/weight_quant.py) and the ONNX / ExecuTorch variants
built from it: the search beats round-to-nearest where it is meant to, GPTQ cuts the output error on
correlated inputs, and the exported files compute exactly what the quantized weights say."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import tiny_model
from effllm.export.executorch_export import quantize_8da4w_
from effllm.export.onnx_export import export_onnx
from effllm.export.quantize import EIGHT_BIT_PROJECTIONS, eight_bit_weights, grams_by_weight, quantize_onnx_dir
from effllm.export.weight_quant import input_gram, quantize_blocks
from effllm.runtime.onnx_backend import OnnxRuntimeBackend

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def weighted_error(weight, quant, importance):
    return float((((quant.dequantize() - weight) ** 2) * importance).sum())


def round_to_nearest(weight, bits, block, symmetric):
    """The plain quantizer the search replaces: the block's range on the grid, no search, no refit."""
    x = weight.reshape(weight.shape[0], -1, block)
    if symmetric:
        scale = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
        return ((x / scale).round().clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale).reshape(weight.shape)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    zero = (-lo / scale).round()
    return ((((x / scale).round() + zero).clamp(0, 2**bits - 1) - zero) * scale).reshape(weight.shape)


@pytest.mark.parametrize("symmetric", [True, False])
def test_search_has_less_weighted_error_than_round_to_nearest(symmetric):
    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    weight[:, 5] *= 8  # an outlier column, as real models have
    importance = torch.rand(128) ** 4 * 100  # a few loud input channels
    quant = quantize_blocks(weight, 4, 32, symmetric, importance)
    low, high = (-8, 7) if symmetric else (0, 15)
    assert quant.codes.min() >= low and quant.codes.max() <= high
    assert (quant.zero_points is None) == symmetric
    rtn = float((((round_to_nearest(weight, 4, 32, symmetric) - weight) ** 2) * importance).sum())
    assert weighted_error(weight, quant, importance) < 0.8 * rtn
    # the importance steers the error: weighting by it beats ignoring it, on the weighted error
    assert weighted_error(weight, quant, importance) < weighted_error(weight, quantize_blocks(weight, 4, 32, symmetric), importance)


def test_odd_widths_pad_the_last_block_and_bfloat16_scales_are_representable():
    weight = torch.randn(6, 45)  # 45 = one whole block and a partial one
    quant = quantize_blocks(weight, 4, 32, True, scale_dtype=torch.bfloat16)
    assert quant.codes.shape == (6, 2, 32) and quant.dequantize().shape == (6, 45)
    assert torch.equal(quant.scales, quant.scales.to(torch.bfloat16).float())
    assert (quant.dequantize() - weight).abs().max() < weight.abs().max() / 7


def test_gram_is_the_second_moment_of_each_linears_input():
    model = tiny_model().eval()
    windows = [[1, 2, 3, 4], [5, 6, 7]]
    table = input_gram(model, windows)
    assert "lm_head" in table and "model.layers.0.mlp.down_proj" in table
    seen = {"lm_head": [], "model.layers.0.self_attn.v_proj": [], "model.layers.0.mlp.down_proj": []}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen[n].append(i[0].reshape(-1, i[0].shape[-1])))
               for n in seen]  # fmt: skip
    with torch.no_grad():
        for w in windows:
            model(torch.tensor([w]))
    for handle in handles:
        handle.remove()
    for name, parts in seen.items():
        inputs = torch.cat(parts)
        torch.testing.assert_close(table[name], inputs.T @ inputs / inputs.shape[0])
    # projections of the same input share one matrix (memory: one per input, not per projection)
    attention = "model.layers.0.self_attn."
    assert table[attention + "q_proj"] is table[attention + "k_proj"] is table[attention + "v_proj"]
    assert table["model.layers.0.mlp.gate_proj"] is table["model.layers.0.mlp.up_proj"]
    assert table[attention + "o_proj"] is not table[attention + "q_proj"]


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_codes_cut_the_output_error_on_correlated_inputs(symmetric):
    """On inputs with correlated channels, GPTQ on the searched grid gives a smaller error in the layer's
    output E||(W - Q) x||^2 than rounding each weight on the same grid, and keeps the grid itself."""
    torch.manual_seed(0)
    mix = torch.randn(96, 96) / 96**0.5 + torch.eye(96) * torch.rand(96) * 3
    x = torch.randn(4096, 96) @ mix  # correlated channels with unequal energy
    gram = x.T @ x / x.shape[0]
    weight = torch.randn(48, 96)
    searched = quantize_blocks(weight, 4, 32, symmetric, gram.diagonal().clone())
    gptq = quantize_blocks(weight, 4, 32, symmetric, gram)
    torch.testing.assert_close(gptq.scales, searched.scales)
    assert not torch.equal(gptq.codes, searched.codes)
    low, high = (-8, 7) if symmetric else (0, 15)
    assert gptq.codes.min() >= low and gptq.codes.max() <= high

    def output_error(quant):
        delta = quant.dequantize() - weight
        return float(torch.einsum("oi,ij,oj->", delta, gram, delta))

    assert output_error(gptq) < 0.7 * output_error(searched)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_onnx_variant_computes_the_quantized_weights(method, tmp_path):
    """MatMulNBits with fp32 compute (accuracy_level 1) on effllm's codes equals torch on the dequantized
    weights: the packing of codes, scales and zero points, the fused q/k/v and gate/up, and the tied
    embedding read from the 8-bit output projection are all exact."""
    model = tiny_model(seed=3, num_hidden_layers=3, num_attention_heads=[4, 2, 4], num_key_value_heads=[2, 1, 4], intermediate_size=[96, 45, 64]).eval()
    export_onnx(model, tmp_path / "onnx", 64)
    windows = [list(range(3, 40)), list(range(50, 90))]
    grams = input_gram(model, windows)
    eight_bit = eight_bit_weights(model)
    assert len(eight_bit) == 3  # one down_proj per layer
    quantize_onnx_dir(tmp_path / "onnx", tmp_path / method, method, 32, grams_by_weight(model, grams), 1, eight_bit)
    reference = copy.deepcopy(model)
    for name, linear in reference.named_modules():
        if isinstance(linear, torch.nn.Linear):
            bits = 8 if method == "int8" or name == "lm_head" or name.endswith(EIGHT_BIT_PROJECTIONS) else 4
            quant = quantize_blocks(linear.weight, bits, 32, False, grams[name])
            linear.weight = torch.nn.Parameter(quant.dequantize())
    reference.model.embed_tokens.weight = reference.lm_head.weight  # the lookup reads the 8-bit table
    backend = OnnxRuntimeBackend(tmp_path / method / "model.onnx")
    ids = list(range(7, 37))
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
        fp32 = model(torch.tensor([ids])).logits[0].numpy()
    got = backend.forward_all(ids, 0)
    backend.close()
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
    assert np.abs(got - fp32).max() > 1e-3  # really quantized


def test_8da4w_weights_carry_the_searched_codes():
    model = tiny_model(seed=1, num_hidden_layers=2, num_attention_heads=[4, 2], num_key_value_heads=[2, 1], intermediate_size=[96, 45]).eval()
    grams = input_gram(model, [list(range(2, 30))])
    quantized = copy.deepcopy(model)
    plan = quantize_8da4w_(quantized, 32, grams)
    name = "model.layers.0.mlp.gate_proj"
    assert plan[name] == "int4 group 32" and plan["lm_head"] == "int8 per-channel"
    expected = quantize_blocks(model.get_submodule(name).weight, 4, 32, True, grams[name], torch.bfloat16)
    weight = quantized.get_submodule(name).weight
    torch.testing.assert_close(weight.dequantize(), expected.dequantize())
