"""GGUF export: the file as gguf.GGUFReader reads it, and the real llama.cpp against torch.

Irregular models (per-layer heads, KV heads and FFN widths, zero-width blocks) run in llama.cpp as its
"deci" architecture; the three zero-width patterns llama.cpp's deci code gets wrong are each checked
with their stand-ins. llama.cpp runs for real (llama-cpp-python, the test extra).
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
from effllm.export.gguf_export import STANDIN_FFN, export_gguf, gguf_layers, rope_rows_to_interleaved
from effllm.export.gguf_quantize import quantization_fallbacks, quantize_gguf, tensor_types
from effllm.export.verify import (
    MAX_REL_LOGIT_DIFF,
    QUANTIZED_THRESHOLDS,
    TOKENIZER_TEXTS,
    max_logit_diff,
)
from effllm.runtime.llamacpp_backend import LlamaCppBackend
from export_helpers import PROMPTS, SHAPES, save_model_dir, scratch_dir, torch_greedy, trained_model_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")

# (heads, KV heads, FFN) per layer: the quickstart-like irregular model and the three zero-width patterns
PATTERNS = {
    "irregular": SHAPES["odd"],  # (4,2,96) (0,0,0) (2,1,17) (6,3,64): an empty layer, an odd FFN width
    "ffn_after_attention": dict(
        num_hidden_layers=3, num_attention_heads=[4, 2, 6], num_key_value_heads=[2, 1, 3], intermediate_size=[96, 0, 64]
    ),
    "ffn_last_layer": dict(
        num_hidden_layers=3, num_attention_heads=[4, 2, 0], num_key_value_heads=[2, 1, 0], intermediate_size=[96, 40, 0]
    ),
    "attention_layer0": dict(
        num_hidden_layers=3,
        num_attention_heads=[0, 2, 6],
        num_key_value_heads=[0, 1, 3],
        intermediate_size=[96, 40, 64],
    ),
    "uniform": dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=40),  # --shape uniform: llama
}
GREEDY = 12


def exported(name: str, tokenizer, dtype: str = "f32", **shape):
    """(torch model, model.gguf) for PATTERNS[name] (or **shape), random weights, cached per test process."""
    key = scratch_dir() / f"gguf-{name}-{dtype}"
    model = tiny_model(**(shape or PATTERNS[name]))
    if not (key / "model.gguf").is_file():
        save_model_dir(model, tokenizer, key / "model")
        export_gguf(model, key, 64, key / "model", dtype=dtype)
    return model, key / "model.gguf"


def field(reader, key):
    return reader.fields[key].contents()


def test_gguf_file_reads_back_with_per_layer_arrays_and_rope_row_order(tokenizer):
    model, path = exported("irregular", tokenizer)
    reader = gguf.GGUFReader(str(path))
    assert field(reader, "general.architecture") == "deci"
    assert field(reader, "deci.attention.head_count") == [4, 0, 2, 6]
    assert field(reader, "deci.attention.head_count_kv") == [2, 0, 1, 3]
    assert field(reader, "deci.feed_forward_length") == [96, 0, 17, 64]
    head_dim = model.config.head_dim
    assert field(reader, "deci.attention.key_length") == field(reader, "deci.rope.dimension_count") == head_dim
    assert field(reader, "deci.attention.layer_norm_rms_epsilon") == pytest.approx(model.config.rms_norm_eps)
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert len(field(reader, "tokenizer.ggml.tokens")) == model.config.vocab_size
    assert field(reader, "tokenizer.ggml.eos_token_id") == model.config.eos_token_id
    assert field(reader, "tokenizer.ggml.add_bos_token") is False

    tensors = {t.name: t for t in reader.tensors}
    assert not any(name.startswith("blk.1.") for name in tensors)  # the empty layer has no tensors at all
    assert "output.weight" not in tensors  # tied embeddings: llama.cpp projects with token_embd
    assert list(tensors["blk.2.ffn_down.weight"].shape) == [17, 64]  # GGUF shapes: row length first
    state = model.state_dict()
    q = state["model.layers.0.self_attn.q_proj.weight"].numpy()
    k = state["model.layers.0.self_attn.k_proj.weight"].numpy()
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"].data, rope_rows_to_interleaved(q, 4))
    np.testing.assert_array_equal(tensors["blk.0.attn_k.weight"].data, rope_rows_to_interleaved(k, 2))
    # llama.cpp rotates rows (2i, 2i+1) together; Hugging Face rotates (i, i + head_dim/2): row 1 is HF's row d/2
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"].data[1], q[head_dim // 2])
    np.testing.assert_array_equal(tensors["blk.0.attn_v.weight"].data, state["model.layers.0.self_attn.v_proj.weight"])


def test_a_uniform_model_is_a_plain_llama_with_one_value_per_hyperparameter(tokenizer):
    _, path = exported("uniform", tokenizer)
    reader = gguf.GGUFReader(str(path))
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.attention.head_count") == 4 and field(reader, "llama.attention.head_count_kv") == 2
    assert field(reader, "llama.feed_forward_length") == 40 and field(reader, "llama.block_count") == 4


def test_standins_are_written_only_where_llamacpp_needs_them():
    layers = gguf_layers([(0, 0, 0), (4, 2, 0), (0, 0, 96), (0, 0, 0), (2, 1, 0)])
    assert [(x.heads, x.kv_heads, x.ffn) for x in layers] == [
        (1, 1, 0),  # attention-free layer 0: one zero head; its zero output may be dropped, so no FFN stand-in
        (4, 2, STANDIN_FFN),  # attention without FFN
        (0, 0, 96),
        (0, 0, 0),  # an empty middle layer is fine in llama.cpp
        (2, 1, STANDIN_FFN),  # FFN-free last layer
    ]
    assert [x.standins for x in layers] == [
        ["attention_layer0"], ["ffn_after_attention"], [], [], ["ffn_last_layer"]
    ]  # fmt: skip


def assert_llamacpp_matches_torch(model, path, tokenizer, label) -> None:
    """Every logit of the prompts and their greedy continuations within fp32's tolerance, and the same tokens."""
    backend = LlamaCppBackend(path, threads=1, kv_cache="f32")
    try:
        for text in PROMPTS:
            prompt = tokenizer(text)["input_ids"]
            expected = torch_greedy(model, prompt, GREEDY)
            with torch.no_grad():
                reference = model(torch.tensor([prompt + expected[:-1]]), use_cache=False).logits[0].numpy()
            got = [backend.forward_all(prompt, 0)]  # prefill, then one decode step per greedy token
            got += [backend.forward_all([t], len(prompt) + i) for i, t in enumerate(expected[:-1])]
            got = np.concatenate(got)
            assert np.abs(got - reference).max() <= max_logit_diff("fp32", reference), label
            assert got[len(prompt) - 1 :].argmax(-1).tolist() == expected, label
    finally:
        backend.close()


@pytest.mark.parametrize("name", list(PATTERNS))
def test_llamacpp_logits_and_greedy_tokens_match_torch(name, tokenizer):
    model, path = exported(name, tokenizer)
    assert_llamacpp_matches_torch(model, path, tokenizer, name)


def test_f16_weights_stay_within_their_threshold(tokenizer):
    model, path = exported("irregular", tokenizer, dtype="f16")
    ids = tokenizer(PROMPTS[0])["input_ids"]
    backend = LlamaCppBackend(path, threads=1, kv_cache="f32")
    with torch.no_grad():
        reference = model(torch.tensor([ids]), use_cache=False).logits[0].numpy()
    diff = float(np.abs(backend.forward_all(ids, 0) - reference).max())
    backend.close()
    assert max_logit_diff("fp32", reference) < diff <= max_logit_diff("f16", reference)  # f16 really is coarser, and within bounds


def test_llamacpp_tokenizer_gives_the_hugging_face_ids(tokenizer):
    _, path = exported("irregular", tokenizer)
    backend = LlamaCppBackend(path, threads=1)
    try:
        for text in TOKENIZER_TEXTS:
            assert backend.tokenize(text) == tokenizer(text)["input_ids"], text
    finally:
        backend.close()


def test_smollm_style_tokenizer_gives_the_hugging_face_ids(corpus, tmp_path):
    """SmolLM's tokenizers split every digit before GPT-2's byte-level regex: written as llama.cpp's
    "smollm" pre-tokenizer, llama.cpp's ids equal Hugging Face's, digits and whitespace runs included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    splitter = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer, raw.decoder = splitter, decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator(corpus[:300], trainer)
    smol = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    model = tiny_model(num_hidden_layers=2)
    path = export_gguf(model, tmp_path, 64, save_model_dir(model, smol, tmp_path / "model"), dtype="f32")
    assert field(gguf.GGUFReader(path), "tokenizer.ggml.pre") == "smollm"
    backend = LlamaCppBackend(path, threads=1)
    try:
        for text in [*TOKENIZER_TEXTS, "In 2024, 12345 apples cost $3.50; a1b22c333"]:
            assert backend.tokenize(text) == smol(text)["input_ids"], text
    finally:
        backend.close()


def test_widths_in_whole_blocks_quantize_without_fallbacks(tokenizer):
    """Every width a multiple of 32 (effllm-train --granularity 32): q8_0 and q4_0 keep every weight in
    their own type; the K-quants need rows of 256, so only widths in whole 256s avoid fallbacks there."""
    _, src = exported(
        "blocks32", tokenizer, dtype="f16", num_attention_heads=[4, 2], num_key_value_heads=[2, 2], intermediate_size=[96, 32],
        num_hidden_layers=2,
    )  # fmt: skip
    for method in ("q8_0", "q4_0"):
        out = quantize_gguf(src.parent, src.parent / method, method)
        assert not [f for f in quantization_fallbacks(out, method) if "not a multiple" in f["reason"]]
        blocks = {
            kind for name, (kind, _) in tensor_types(out).items() if name.startswith("blk.") and "norm" not in name
        }
        assert blocks == {method.upper()}  # every layer weight in the method's type (the output projection may differ)
    out = quantize_gguf(src.parent, src.parent / "q4_k_m", "q4_k_m")
    fallbacks = quantization_fallbacks(out, "q4_k_m")  # hidden 64: every row is shorter than a K-quant block
    assert fallbacks and all("not a multiple of Q4_K's block of 256" in f["reason"] for f in fallbacks)

    _, src = exported(
        "blocks256", tokenizer, dtype="f16", hidden_size=256, head_dim=64, num_attention_heads=[4, 4],
        num_key_value_heads=[2, 4], intermediate_size=[256, 512], num_hidden_layers=2,
    )  # fmt: skip
    out = quantize_gguf(src.parent, src.parent / "q4_k_m", "q4_k_m")
    fallbacks = quantization_fallbacks(out, "q4_k_m")
    assert not [f for f in fallbacks if "not a multiple" in f["reason"]]  # only the mix's deliberate choices
    assert "Q4_K" in {kind for kind, _ in tensor_types(out).values()}


@pytest.mark.parametrize("method, block_type", [("q4_0", "Q4_0"), ("q4_k_m", "Q5_0")])
def test_gguf_4_bit_variants_hold_gptq_codes_that_llamacpp_runs(method, block_type, tokenizer):
    """With the inputs' E[x x^T], every Q4_0 / Q5_0 tensor llama.cpp wrote (q4_k_m's fallback for rows shorter
    than 256) is replaced by weight_quant's codes (q/k rows in the file's interleaved order): the file
    dequantizes to exactly those weights, they differ from llama.cpp's own rounding, and llama.cpp runs the
    file with logits near torch's on the same weights."""
    from effllm.export.gguf_quantize import SYMMETRIC_BLOCK_BITS, gguf_linears
    from effllm.export.weight_quant import input_gram, quantize_blocks

    model, src = exported(
        "blocks32", tokenizer, dtype="f16", num_attention_heads=[4, 2], num_key_value_heads=[2, 2], intermediate_size=[96, 32],
        num_hidden_layers=2,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (8, 32), generator=generator).tolist()
    grams = input_gram(model, windows)
    plain = quantize_gguf(src.parent, src.parent / f"{method}-plain", method)
    out = quantize_gguf(src.parent, src.parent / f"{method}-gptq", method, model=model, grams=grams)
    linears = gguf_linears(model)
    before = {t.name: t for t in gguf.GGUFReader(str(plain)).tensors}
    checked = 0
    for tensor in gguf.GGUFReader(str(out)).tensors:
        if tensor.tensor_type.name != block_type:
            continue
        name, heads = linears[tensor.name]
        weight = model.get_submodule(name).weight.detach().float()
        if heads:
            weight = torch.from_numpy(rope_rows_to_interleaved(weight.numpy(), heads))
        bits = SYMMETRIC_BLOCK_BITS[block_type]
        expected = quantize_blocks(weight, bits, 32, True, grams[name], torch.float16).dequantize().numpy()
        np.testing.assert_array_equal(gguf.quants.dequantize(tensor.data, tensor.tensor_type), expected)
        assert not np.array_equal(tensor.data, before[tensor.name].data)
        checked += 1
    assert checked >= 10  # (q4_0: all 7 projections of both layers; q4_k_m keeps some at Q8_0)

    quantized = tiny_model(
        num_attention_heads=[4, 2], num_key_value_heads=[2, 2], intermediate_size=[96, 32], num_hidden_layers=2
    )
    quantized.load_state_dict(model.state_dict())
    with torch.no_grad():
        for tensor in gguf.GGUFReader(str(out)).tensors:
            if tensor.tensor_type.name in SYMMETRIC_BLOCK_BITS and tensor.name in linears:
                name, heads = linears[tensor.name]
                rows = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
                if heads:  # back to rotate_half order (the inverse of rope_rows_to_interleaved)
                    rows = rows.reshape(heads, -1, 2, rows.shape[-1]).transpose(1, 2).reshape(rows.shape)
                quantized.get_submodule(name).weight.copy_(rows)
    ids = tokenizer.encode(PROMPTS[0])
    backend = LlamaCppBackend(out, kv_cache="f32")
    try:
        got = backend.forward_all(ids, 0)
    finally:
        backend.close()
    with torch.no_grad():
        same_weights = quantized(torch.tensor([ids])).logits[0].numpy()
        fp32 = model(torch.tensor([ids])).logits[0].numpy()
    # llama.cpp quantizes activations to 8 bits for its Q4_0 dot products: close to, not equal to, torch
    assert np.abs(got - same_weights).max() < 0.5 * np.abs(got - fp32).max()


def run_cli(argv):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in argv])
    return code, stdout.getvalue(), stderr.getvalue()


def test_cli_exports_quantizes_and_verifies_gguf(tokenizer, corpus):
    model_dir = trained_model_dir(tokenizer, corpus)
    out = model_dir.parent / "gguf-export"
    code, stdout, stderr = run_cli(
        [model_dir, "--format", "gguf", "--quantize", "all", "--max-seq-len", 128, "--out", out]
    )
    assert code == 0, stderr[-3000:]
    report = json.loads((out / "verify.json").read_text())
    variants = {v["name"]: v for v in report["variants"]}
    assert list(variants) == ["gguf", "gguf-q8_0", "gguf-q4_0", "gguf-q4_k_m"]
    for name, v in variants.items():
        assert (out / name / "model.gguf").is_file() and (out / name / "tokenizer.json").is_file()
        assert v["passed"], (name, v["failures"])
        assert v["tokenizer_equal_texts"] == v["tokenizer_texts"] == len(TOKENIZER_TEXTS)
    assert variants["gguf"]["quantization"] == "f16"
    assert variants["gguf"]["max_rel_logit_diff"] <= MAX_REL_LOGIT_DIFF["f16"]
    assert variants["gguf"]["greedy_equal_prompts"] == variants["gguf"]["prompts"]
    for name in ("gguf-q8_0", "gguf-q4_0", "gguf-q4_k_m"):
        v = variants[name]
        limits = QUANTIZED_THRESHOLDS[v["quantization"]]
        assert v["top1_agreement"] >= limits["min_top1_agreement"] and v["ppl_increase"] <= limits["max_ppl_increase"]
        assert v["size_bytes"] < variants["gguf"]["size_bytes"]
    # The trained model's FFN widths 40 and 80 are not multiples of 32: ffn_down of both layers falls back.
    fallbacks = {f["tensor"] for f in variants["gguf-q4_0"]["tensor_fallbacks"]}
    assert {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"} <= fallbacks
    markdown = (out / "verify.md").read_text()
    assert "| gguf-q4_k_m |" in markdown and "## GGUF tensors in another type" in markdown


def test_generate_runs_the_gguf_export_in_llamacpp(tokenizer, capsys):
    from effllm.runtime.cli import generate_main

    _, path = exported("irregular", tokenizer)
    capsys.readouterr()
    code = generate_main([str(path.parent), "The return statement", "--backend", "llamacpp", "--max-new-tokens", "8"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.startswith("The return statement")
    assert "[llamacpp]" in captured.err and "8 new tokens" in captured.err


def test_a_model_llamacpp_cannot_express_exits_2_and_leaves_out_untouched(tokenizer, tmp_path):
    model = tiny_model(num_hidden_layers=2, hidden_act="gelu")
    model_dir = save_model_dir(model, tokenizer, tmp_path / "model")
    out = tmp_path / "out"
    (out / "gguf").mkdir(parents=True)
    (out / "gguf" / "model.gguf").write_bytes(b"an earlier export")
    code, stdout, stderr = run_cli([model_dir, "--format", "gguf", "--out", out])
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and "cannot express the 'gelu' activation" in stderr
    assert sorted(p.name for p in out.rglob("*")) == ["gguf", "model.gguf"]
    assert (out / "gguf" / "model.gguf").read_bytes() == b"an earlier export"


@pytest.mark.parametrize("missing_llamacpp", [False, True])
def test_format_all_refuses_rather_than_drops_gguf(missing_llamacpp, tokenizer, tmp_path, monkeypatch):
    """--format all (the default) promises every format: one GGUF cannot take exits 2 before anything is
    written, and the line names the flag that exports the others."""
    import importlib.util

    model_dir = save_model_dir(tiny_model(num_hidden_layers=2), tokenizer, tmp_path / "model")
    if missing_llamacpp:
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else find_spec(name, *a))
        reason = "llama.cpp (its quantizer and the verification), which is not installed"
    else:
        model_dir = save_model_dir(tiny_model(num_hidden_layers=2, hidden_act="gelu"), tokenizer, tmp_path / "gelu")
        reason = "cannot express the 'gelu' activation"
    for argv in ([], ["--format", "all"], ["--format", "onnx", "gguf", "executorch"]):
        code, _, stderr = run_cli([model_dir, *argv, "--out", tmp_path / "out"])
        assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
        assert reason in stderr and stderr.strip().endswith("leave GGUF out: --format onnx executorch"), stderr
    assert not (tmp_path / "out").exists()


def test_format_takes_several_formats(tokenizer, tmp_path):
    from effllm.export.cli import build_parser
    from effllm.export.inputs import resolve_plan

    model_dir = save_model_dir(tiny_model(num_hidden_layers=2), tokenizer, tmp_path / "model")
    argv = [str(model_dir), "--format", "executorch", "onnx", "--quantize", "all", "--out", str(tmp_path / "out")]
    plan = resolve_plan(build_parser().parse_args(argv))
    assert [v.name for v in plan.variants] == ["onnx", "executorch", "onnx-int8", "onnx-int4", "executorch-8da4w"]
