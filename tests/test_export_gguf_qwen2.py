"""GGUF export of Qwen2-family models: q/k/v biases (and MLP biases, an untied output) in llama.cpp's deci
architecture, against torch, zero-width layers included; effllm-export verifies such a model end to end.

llama.cpp's own qwen2 architecture is not an option for a pruned model: its loader sizes every layer's
tensors by layer 0's head and FFN counts (docs/formats.md, "GGUF"). deci's graph adds a bias wherever the
layer's file has one.
"""

from __future__ import annotations

import contextlib
import io
import json

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_model
from effllm.export.cli import main
from effllm.export.gguf_export import export_gguf, rope_rows_to_interleaved
from effllm.export.gguf_quantize import quantize_gguf, tensor_types
from effllm.export.verify import MAX_REL_LOGIT_DIFF, max_logit_diff
from effllm.runtime.llamacpp_backend import LlamaCppBackend
from export_helpers import PROMPTS, save_model_dir, scratch_dir
from test_export_gguf import PATTERNS, assert_llamacpp_matches_torch

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")

QWEN2 = dict(attention_bias=True, tie_word_embeddings=False)  # Qwen2-7B and up: biased q/k/v, own lm_head
BIAS_STD = 0.5  # conftest's biases (std 0.02) barely move the logits; these move them by ~2% of their scale
GREEDY = 8


def biased_model(name: str, **extra):
    """PATTERNS[name] with Qwen2's biases (plus **extra), large enough that a misplaced bias shows."""
    model = tiny_model(**PATTERNS[name], **QWEN2, **extra)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias"):
                param.normal_(0, BIAS_STD)
    return model


def exported(name: str, tokenizer, dtype: str = "f32", **extra):
    key = scratch_dir() / f"gguf-qwen2-{name}-{dtype}-{'-'.join(extra)}"
    model = biased_model(name, **extra)
    if not (key / "model.gguf").is_file():
        save_model_dir(model, tokenizer, key / "model")
        export_gguf(model, key, 64, key / "model", dtype=dtype)
    return model, key / "model.gguf"


def test_a_transformers_qwen2_runs_in_llamacpp_as_it_does_in_transformers(tokenizer, tmp_path):
    """Qwen2ForCausalLM itself (random, untied), imported by effllm and exported: llama.cpp's logits are
    transformers' own, to fp32 tolerance."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from effllm.model.convert import from_source_model

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=80, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    source = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in source.named_parameters():
            param.uniform_(0.5, 1.5) if "norm" in name else param.normal_(0, BIAS_STD if name.endswith("bias") else 0.1)
    model = from_source_model(source)
    assert model.config.attention_bias and not model.config.tie_word_embeddings
    path = export_gguf(model, tmp_path, 64, save_model_dir(model, tokenizer, tmp_path / "model"), dtype="f32")
    backend = LlamaCppBackend(path, threads=1, kv_cache="f32")
    try:
        for text in PROMPTS:
            ids = tokenizer(text)["input_ids"]
            with torch.no_grad():
                reference = source(torch.tensor([ids])).logits[0].numpy()
            assert np.abs(backend.forward_all(ids, 0) - reference).max() <= max_logit_diff("fp32", reference), text
    finally:
        backend.close()


def test_biases_are_written_in_llamacpp_row_order(tokenizer):
    model, path = exported("irregular", tokenizer)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    state = model.state_dict()
    for i, (heads, kv, _) in enumerate(model.config.layer_shapes()):
        if not heads:
            assert not any(name.startswith(f"blk.{i}.attn") for name in tensors)
            continue
        hf = f"model.layers.{i}.self_attn."
        # q and k biases move with their rows (RoPE pairs), v's stay in place; biases stay f32
        for gguf_name, hf_name, order in (("attn_q", "q_proj", heads), ("attn_k", "k_proj", kv), ("attn_v", "v_proj", 0)):
            bias = state[hf + hf_name + ".bias"].numpy()
            tensor = tensors[f"blk.{i}.{gguf_name}.bias"]
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(tensor.data, rope_rows_to_interleaved(bias, order) if order else bias)
        assert f"blk.{i}.attn_output.bias" not in tensors  # Qwen2's o_proj has none
    np.testing.assert_array_equal(tensors["output.weight"].data, state["lm_head.weight"].numpy())  # untied


@pytest.mark.parametrize(
    "name, extra",
    [("irregular", {}), ("irregular", {"mlp_bias": True})] + [(name, {"mlp_bias": True}) for name in PATTERNS if name != "irregular"],
)  # fmt: skip
def test_llamacpp_matches_torch_with_biases_and_standins(name, extra, tokenizer):
    """f32 weights: every logit within fp32's tolerance and the same greedy tokens, with the zero-width
    stand-ins (which carry no biases) in a biased model."""
    model, path = exported(name, tokenizer, **extra)
    assert_llamacpp_matches_torch(model, path, tokenizer, (name, extra))


def test_quantized_bias_model_keeps_its_biases_in_f32(tokenizer):
    _, src = exported("irregular", tokenizer, dtype="f16")
    out = quantize_gguf(src.parent, src.parent / "q8_0", "q8_0", threads=1)
    types = tensor_types(out)
    biases = {name: kind for name, (kind, _) in types.items() if name.endswith(".bias")}
    assert biases and set(biases.values()) == {"F32"}
    backend = LlamaCppBackend(out, threads=1)
    try:
        assert np.isfinite(backend.forward_all(list(range(1, 9)), 0)).all()
    finally:
        backend.close()


def test_cli_exports_and_verifies_a_qwen2_style_model(tokenizer, tmp_path):
    model = biased_model("irregular")
    model_dir = save_model_dir(model, tokenizer, tmp_path / "model")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(model_dir), "--format", "gguf", "--max-seq-len", "64", "--out", str(tmp_path / "out")])
    assert code == 0, stderr.getvalue()[-3000:]
    (variant,) = json.loads((tmp_path / "out" / "verify.json").read_text())["variants"]
    assert variant["passed"], variant["failures"]
    assert variant["quantization"] == "f16" and variant["max_rel_logit_diff"] <= MAX_REL_LOGIT_DIFF["f16"]
    assert variant["greedy_equal_prompts"] == variant["prompts"]


def test_llamacpps_own_qwen2_architecture_refuses_per_layer_shapes(tokenizer, tmp_path, monkeypatch):
    """Why the file says deci: the same irregular tensors declared as llama.cpp's qwen2 do not load (its loader
    sizes every layer by layer 0's counts), and the error names the cause, not only that the load failed."""
    from effllm.export import gguf_export
    from effllm.runtime.backend import GenerationError

    monkeypatch.setattr(gguf_export, "ARCH", "qwen2")
    model = biased_model("ffn_after_attention")  # heads 4, 2, 6: layer 1 differs from layer 0
    path = export_gguf(model, tmp_path, 64, save_model_dir(model, tokenizer, tmp_path / "model"), dtype="f32")
    with pytest.raises(GenerationError, match="check_tensor_dims: tensor 'blk.1.attn_q.weight' has wrong shape"):
        LlamaCppBackend(path, threads=1)
