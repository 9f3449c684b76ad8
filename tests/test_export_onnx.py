"""ONNX export of uniform and irregular models: onnxruntime and onnxruntime-genai against torch."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_model
from effllm.export.onnx_export import export_onnx, kv_heads_per_cache_layer, past_input_names
from effllm.export.verify import QUANTIZED_THRESHOLDS
from effllm.runtime.genai_backend import genai_greedy
from effllm.runtime.onnx_backend import OnnxRuntimeBackend
from export_helpers import (
    MAX_SEQ_LEN,
    PROMPTS,
    SHAPES,
    before_eos,
    cli_export_of_trained_model,
    encode,
    heldout_windows,
    random_model_dir,
    save_model_dir,
    top1_and_ppl_change,
    torch_greedy,
    trained_model_dir,
)

from effllm import EfficientLLMForCausalLM

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


@pytest.fixture(scope="module", params=["uniform", "irregular", "odd"])
def exported(request, tokenizer, corpus, tmp_path_factory):
    """(torch model, model dir, ONNX dir); "irregular" is the trained model exported by the CLI."""
    if request.param == "irregular":
        model_dir = trained_model_dir(tokenizer, corpus)
        onnx_dir = cli_export_of_trained_model(tokenizer, corpus).out / "onnx"
    else:
        _, model_dir = random_model_dir(request.param, tokenizer)
        onnx_dir = tmp_path_factory.mktemp(f"onnx-{request.param}")
        export_onnx(EfficientLLMForCausalLM.from_pretrained(model_dir), onnx_dir, MAX_SEQ_LEN, model_dir=model_dir)
    return EfficientLLMForCausalLM.from_pretrained(model_dir).eval(), model_dir, onnx_dir


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_graph_has_static_per_layer_kv_heads(exported):
    model, _, onnx_dir = exported
    config = model.config
    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    dims.update({v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.output})
    kv = kv_heads_per_cache_layer(config)
    assert kv == [config.layer_shapes()[i][1] for i in config.attention_layer_indices()]
    for i, heads in enumerate(kv):
        assert dims[f"past_key_values.{i}.key"] == ["batch_size", heads, "past_sequence_length", config.head_dim]
        assert dims[f"present.{i}.value"] == ["batch_size", heads, "total_sequence_length", config.head_dim]
    assert f"past_key_values.{len(kv)}.key" not in dims  # layers without attention have no cache
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert dims["logits"] == ["batch_size", "sequence_length", config.vocab_size]
    genai = json.loads((onnx_dir / "genai_config.json").read_text())["model"]
    assert genai["type"] == "decoder" and genai["decoder"]["num_hidden_layers"] == len(kv)
    assert genai["decoder"]["head_size"] == config.head_dim


def test_graph_uses_onnxruntime_fused_operators(exported):
    """Each layer's attention is one GroupQueryAttention node with that layer's own head counts, RoPE two
    RotaryEmbedding nodes, every RMSNorm one SimplifiedLayerNormalization node."""
    model, _, onnx_dir = exported
    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph
    shapes = model.config.layer_shapes()
    attention = [(h, kv) for h, kv, _ in shapes if h]
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in gqa]
    assert [(a["num_heads"], a["kv_num_heads"]) for a in attrs] == attention
    assert all(n.domain == "com.microsoft" for n in gqa)
    ops = [n.op_type for n in graph.node]
    assert ops.count("RotaryEmbedding") == 2 * len(attention)
    assert ops.count("SimplifiedLayerNormalization") == len(attention) + sum(f > 0 for *_, f in shapes) + 1
    assert "Softmax" not in ops and "ReduceMean" not in ops


def test_onnxruntime_prefill_and_decode_match_torch(exported):
    """Batch of two, the second left-padded: prefill, then 6 decode steps through the KV cache."""
    model, _, onnx_dir = exported
    session = _session(onnx_dir / "model.onnx")
    names = past_input_names(model.config)
    kv = [h for h in kv_heads_per_cache_layer(model.config) for _ in range(2)]
    torch.manual_seed(1)
    prompt_len, pad, steps = 9, 3, 6
    ids = torch.randint(1, model.config.vocab_size, (2, prompt_len + steps))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits.numpy()

    past = [np.zeros((2, h, 0, model.config.head_dim), np.float32) for h in kv]
    got = []
    for start, end in [(0, prompt_len)] + [(t, t + 1) for t in range(prompt_len, prompt_len + steps)]:
        feed = {
            "input_ids": ids[:, start:end].numpy(),
            "attention_mask": mask[:, :end].numpy(),
            "position_ids": positions[:, start:end].numpy(),
            **dict(zip(names, past)),
        }
        logits, *past = session.run(None, feed)
        got.append(logits)
        assert past[0].shape[2] == end
    got = np.concatenate(got, axis=1)
    real = mask.bool().numpy()  # logits at padding positions are never used
    diff = np.abs(got - expected)[real].max()
    assert diff <= 1e-4, diff
    assert (got.argmax(-1) == expected.argmax(-1))[real].all()


def test_genai_greedy_tokens_equal_torch(exported):
    model, model_dir, onnx_dir = exported
    new_tokens = 20
    for text in PROMPTS:
        prompt = encode(model_dir, text)
        got = genai_greedy(onnx_dir, prompt, new_tokens)
        expected = before_eos(torch_greedy(model, prompt, new_tokens), model.config.eos_token_id)
        assert got == expected, text
        assert len(got) > 0


@pytest.mark.parametrize("method, op", [("int8", "MatMulNBits"), ("int4", "MatMulNBits")])
def test_quantized_variant_within_thresholds(method, op, tokenizer, corpus):
    """The CLI's quantized directories: every matmul quantized, smaller, accurate enough, and runnable in genai."""

    run = cli_export_of_trained_model(tokenizer, corpus)
    model_dir = trained_model_dir(tokenizer, corpus)
    model = EfficientLLMForCausalLM.from_pretrained(model_dir).eval()
    qdir = run.out / f"onnx-{method}"
    graph = onnx.load(str(qdir / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    # Per attention layer q/k/v as one matmul + o_proj, per FFN gate/up as one + down, 1 lm_head (tied: folded transpose).
    shapes = model.config.layer_shapes()
    linears = sum(2 * (h > 0) + 2 * (f > 0) for h, _, f in shapes) + 1
    assert ops.count(op) == linears
    assert "MatMul" not in ops or all(
        n.input[1] not in {i.name for i in graph.initializer} for n in graph.node if n.op_type == "MatMul"
    )
    assert (qdir / "model.onnx").stat().st_size < (run.out / "onnx" / "model.onnx").stat().st_size
    # one 8-bit copy of the tied embedding: the lookup reads the lm_head's quantized weight
    config = model.config
    assert "GatherBlockQuantized" in ops
    assert not [i.name for i in graph.initializer if list(i.dims) == [config.vocab_size, config.hidden_size]]

    session = _session(qdir / "model.onnx")
    names = past_input_names(model.config)
    kv = [h for h in kv_heads_per_cache_layer(model.config) for _ in range(2)]

    def run_window(ids):
        feed = {
            "input_ids": np.array([ids]),
            "attention_mask": np.ones((1, len(ids)), np.int64),
            "position_ids": np.arange(len(ids))[None],
            **{n: np.zeros((1, h, 0, model.config.head_dim), np.float32) for n, h in zip(names, kv)},
        }
        return session.run(None, feed)[0][0]

    windows = heldout_windows(model_dir, 100)
    top1, ppl_change = top1_and_ppl_change(model, windows, run_window)
    limits = QUANTIZED_THRESHOLDS[method]
    assert top1 >= limits["min_top1_agreement"], top1
    assert ppl_change <= limits["max_ppl_increase"], ppl_change
    with torch.no_grad():  # really quantized, not a copy of fp32
        assert np.abs(run_window(windows[0]) - model(torch.tensor([windows[0]])).logits[0].numpy()).max() > 1e-3

    assert len(genai_greedy(qdir, encode(model_dir, PROMPTS[0]), 10)) > 0  # genai runs it too


def test_large_model_path_external_data(tokenizer, tmp_path, monkeypatch):
    """Models above EXTERNAL_DATA_BYTES (any fp32 model of ~270M+ parameters) keep their weights in
    model.onnx.data; forced here on a tiny one: onnxruntime, genai and both quantizers still work."""
    import effllm.export.onnx_export as onnx_export
    import onnxruntime_genai as og
    from effllm.export.quantize import quantize_onnx_dir

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    model, model_dir = random_model_dir("uniform", tokenizer)
    export_onnx(model, tmp_path / "onnx", MAX_SEQ_LEN, model_dir=model_dir)
    assert (tmp_path / "onnx" / "model.onnx.data").stat().st_size > (tmp_path / "onnx" / "model.onnx").stat().st_size
    ids = list(range(5, 17))
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    kv = [h for h in kv_heads_per_cache_layer(model.config) for _ in range(2)]
    for variant, tolerance in (("onnx", 1e-4), ("onnx-int8", 0.5), ("onnx-int4", 0.5)):
        if variant != "onnx":
            quantize_onnx_dir(tmp_path / "onnx", tmp_path / variant, variant.split("-")[1])
        feed = {
            "input_ids": np.array([ids]),
            "attention_mask": np.ones((1, len(ids)), np.int64),
            "position_ids": np.arange(len(ids))[None],
            **{
                n: np.zeros((1, h, 0, model.config.head_dim), np.float32)
                for n, h in zip(past_input_names(model.config), kv)
            },
        }
        logits = _session(tmp_path / variant / "model.onnx").run(None, feed)[0][0]
        assert np.abs(logits - expected).max() <= tolerance, variant
    assert og.Model(str(tmp_path / "onnx")) is not None


@pytest.mark.parametrize("bias_std, logit_gain", [(0.02, 1.0), (5.0, 1.0), (0.02, 50.0), (5.0, 50.0)])
def test_bias_model_differs_from_torch_by_float_rounding_only(bias_std, logit_gain, tokenizer, tmp_path):
    """A model with q/k/v and MLP biases and an untied lm_head: onnxruntime is as close to the exact (float64
    torch) logits as fp32 torch is, whether the biases are tiny or dominate, and the difference keeps its
    share of the logits' scale when the logits grow 50x: rounding, not a misplaced bias or norm (measured:
    2.7e-7 to 3.8e-7 of the scale on both sides)."""
    model = tiny_model(**SHAPES["odd"], attention_bias=True, mlp_bias=True, tie_word_embeddings=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, bias_std)
        model.lm_head.weight.mul_(logit_gain)
    model_dir = save_model_dir(model, tokenizer, tmp_path / "model")
    export_onnx(model, tmp_path / "onnx", MAX_SEQ_LEN, model_dir=model_dir)
    backend = OnnxRuntimeBackend(tmp_path / "onnx", threads=1)
    exact = copy.deepcopy(model).double()
    try:
        for text in PROMPTS:
            ids = torch.tensor([encode(model_dir, text)])
            with torch.no_grad():
                truth = exact(ids, use_cache=False).logits[0].numpy()
                fp32 = model(ids, use_cache=False).logits[0].double().numpy()
            got = backend.forward_all(ids[0].tolist(), 0).astype(np.float64)
            scale = np.abs(truth).max()
            assert scale > 0.1 * logit_gain  # the gain really scales the logits
            onnx_error, torch_error = np.abs(got - truth).max() / scale, np.abs(fp32 - truth).max() / scale
            assert onnx_error <= max(3 * torch_error, 1e-6), (text, onnx_error, torch_error)
    finally:
        backend.close()
