"""The EfficientLLM model format: import from Llama/Qwen2/Mistral, irregular shapes, save/load anywhere."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import IRREGULAR, tiny_config, tiny_model
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from effllm import EfficientLLMConfig, EfficientLLMConfigError, EfficientLLMForCausalLM
from effllm.common.errors import EffllmError
from effllm.model import convert
from effllm.model.params import architecture_summary, count_module_parameters, count_parameters

COMMON = dict(
    vocab_size=384,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=80,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _randomize(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    return model.eval()


SOURCES = {
    "llama-tied": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=True)),
    "llama-untied": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=False)),
    "llama3-rope": lambda: LlamaForCausalLM(
        LlamaConfig(
            **COMMON,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        )
    ),
    "linear-rope": lambda: LlamaForCausalLM(
        LlamaConfig(**COMMON, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    ),
    "dynamic-rope": lambda: LlamaForCausalLM(
        LlamaConfig(
            **{**COMMON, "max_position_embeddings": 16},
            rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        )
    ),
    "qwen2-bias": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=True)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=None)),
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_import_matches_source(name, tmp_path):
    source = _randomize(SOURCES[name]())
    source.save_pretrained(tmp_path / "src")
    model, _ = convert.from_pretrained(tmp_path / "src", tokenizer=False)
    assert model.config.tie_word_embeddings == source.config.tie_word_embeddings
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert count_module_parameters(model) == count_module_parameters(source)
    ids = torch.randint(3, 384, (2, 24))  # longer than the dynamic-rope source's 16 positions
    with torch.no_grad():
        diff = (model(ids).logits - source(ids).logits).abs().max().item()
    assert diff <= 1e-5, diff
    prompt = ids[:1, :5]
    for use_cache in (True, False):
        ours = model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=use_cache, eos_token_id=None)
        theirs = source.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=use_cache, eos_token_id=None)
        assert ours.shape[1] == 25
        assert torch.equal(ours, theirs), (use_cache, ours, theirs)


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(convert.UnsupportedSourceError, match="GPT2LMHeadModel; effllm imports only .*LlamaForCausalLM"):
        convert.from_pretrained(tmp_path)
    assert issubclass(convert.UnsupportedSourceError, EffllmError)
    with pytest.raises(convert.UnsupportedSourceError, match="cannot read a model config"):
        convert.from_pretrained(tmp_path / "missing")


def test_irregular_forward_generate_and_cache():
    model = tiny_model(**IRREGULAR)
    assert model.config.layer_shapes() == [(4, 2, 96), (0, 0, 0), (2, 1, 17), (6, 3, 64)]
    assert model.model.layers[1].self_attn is None and model.model.layers[1].mlp is None
    assert model.config.attention_layer_indices() == [0, 2, 3]
    ids = torch.randint(1, 512, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        # Prefill 7 tokens, then decode the rest one at a time through the cache.
        out = model(ids[:, :7], use_cache=True)
        steps = [out.logits]
        cache = out.cache
        for t in range(7, 12):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    cached = model.generate(ids[:1, :4], max_new_tokens=20, do_sample=False, eos_token_id=None)
    recomputed = model.generate(ids[:1, :4], max_new_tokens=20, do_sample=False, use_cache=False, eos_token_id=None)
    assert torch.equal(cached, recomputed)
    torch.manual_seed(3)
    s1 = model.generate(ids[:1, :4], max_new_tokens=10, do_sample=True, top_k=20, temperature=0.9, eos_token_id=None)
    torch.manual_seed(3)
    s2 = model.generate(ids[:1, :4], max_new_tokens=10, do_sample=True, top_k=20, temperature=0.9, eos_token_id=None)
    assert torch.equal(s1, s2) and s1.shape[1] == 14


def test_left_padding_matches_unpadded():
    model = tiny_model(**IRREGULAR)
    ids = torch.randint(1, 512, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    with torch.no_grad():
        ref = model(ids).logits
        out = model(padded, attention_mask=mask).logits[:, 3:]
    assert torch.allclose(out, ref, atol=1e-5)
    a = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
    b = model.generate(padded, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert torch.equal(a[:, 6:], b[:, 9:])


# A fresh interpreter must never stop at transformers' "Do you wish to run the custom code?" prompt.
NO_PROMPT = """
import builtins
def _no_prompt(*args):
    raise SystemExit("prompted for input: " + str(args)[:300])
builtins.input = _no_prompt
"""
MODEL_TYPE_WARNING = "to instantiate a model of type"  # transformers' fallback after a refused prompt


def _small_tokenizer():
    from effllm.model.tokenizer import train_ascii_bpe

    return train_ascii_bpe(["def f(x):\n    return x + 1\n", "The return statement leaves a function."] * 20, 300)


def test_save_load_and_remote_code_without_effllm(tmp_path):
    model = tiny_model(**IRREGULAR, tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    tokenizer = _small_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_effllm.EfficientLLMForCausalLM"
    assert saved["per_layer_config"]["2"] == {
        "intermediate_size": 17,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    ids = torch.randint(1, 512, (1, 10))
    with torch.no_grad():
        ref = model(ids).logits
        again = EfficientLLMForCausalLM.from_pretrained(tmp_path).eval()(ids).logits
    assert torch.equal(ref, again)
    torch.save({"ids": ids, "ref": ref}, tmp_path / "ref.pt")
    text = "def g(y):\n    return y"
    # A fresh interpreter where importing effllm fails, as on a machine without the package.
    script = NO_PROMPT + textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "effllm" or name.startswith("effllm."):
                    raise ImportError("effllm is blocked in this test")
        sys.meta_path.insert(0, Block())
        import torch
        torch.set_num_threads({torch.get_num_threads()})  # bitwise equality needs the same reduction order
        from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
        try:
            import effllm
            raise SystemExit("effllm should not be importable here")
        except ImportError:
            pass
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        with torch.no_grad():
            out = m(ref["ids"]).logits
        print("maxdiff", (out - ref["ref"]).abs().max().item())
        assert torch.equal(out, ref["ref"])
        # The tokenizer, the two ways the model format documents for a machine without effllm.
        for tok in (PreTrainedTokenizerFast.from_pretrained({str(tmp_path)!r}),
                    AutoTokenizer.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)):
            print("ids", tok({text!r})["input_ids"], tok.eos_token)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "maxdiff 0.0" in run.stdout
    expected = f"ids {tokenizer(text)['input_ids']} <|endoftext|>"
    assert run.stdout.count(expected) == 2, (expected, run.stdout)
    assert MODEL_TYPE_WARNING not in run.stderr, run.stderr[-3000:]


def test_auto_classes_registered(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    tiny_model(**IRREGULAR).save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), EfficientLLMConfig)
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), EfficientLLMForCausalLM)


# `import effllm` alone: no torch or transformers, no import hook, no logging change, no registration;
# and the config module does not import the model module.
IMPORT_EFFLLM_ALONE = """
import logging
hooks = list(sys.meta_path)
levels = [logging.getLogger(name).level for name in ("torchao", "torch.utils._pytree")]
import effllm
assert list(sys.meta_path) == hooks, "import effllm changed sys.meta_path"
assert levels == [logging.getLogger(name).level for name in effllm.NOISY_LOGGERS], "import effllm changed logging"
assert not {"torch", "transformers"} & set(sys.modules), "import effllm imported torch or transformers"
import effllm.model.configuration_effllm
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
assert "effllm.model.modeling_effllm" not in sys.modules, "the config module imports the model module"
assert "effllm" not in CONFIG_MAPPING, "registered before the model classes were imported"
"""


@pytest.mark.parametrize("order", ["effllm first", "transformers first"])
def test_importing_the_model_classes_registers_them(tmp_path, order):
    """`import effllm` changes nothing in the process (no torch, no registration, no import hook, no
    logging levels); importing the model classes registers them with the Auto classes, whichever of
    effllm and transformers is imported first, so the directory (tokenizer included) loads without
    trust_remote_code and without a prompt."""
    tiny_model(**IRREGULAR).save_pretrained(tmp_path)
    tokenizer = _small_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    imports = IMPORT_EFFLLM_ALONE if order == "effllm first" else "import transformers\n"
    script = NO_PROMPT + "import sys\n" + imports + textwrap.dedent(f"""
        from effllm import EfficientLLMForCausalLM
        from transformers import AutoModelForCausalLM, AutoTokenizer
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        tok = AutoTokenizer.from_pretrained({str(tmp_path)!r})
        print(type(m).__module__, tok("return x")["input_ids"])
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == f"effllm.model.modeling_effllm {tokenizer('return x')['input_ids']}"
    assert MODEL_TYPE_WARNING not in run.stderr, run.stderr[-3000:]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(num_attention_heads=[4, 3, 2, 6], num_key_value_heads=[2, 2, 1, 3]),
            "layer 1: num_attention_heads \\(3\\) is not divisible",
        ),
        (dict(intermediate_size=[96, -1, 17, 64]), "layer 1: sizes must be >= 0"),
        (dict(intermediate_size=[96, 17]), "intermediate_size has 2 entries but num_hidden_layers is 4"),
        (
            dict(num_attention_heads=[4, 0, 2, 6], num_key_value_heads=[2, 1, 1, 3]),
            "layer 1: 0 query heads with 1 KV heads",
        ),
        (dict(per_layer_config={7: {"intermediate_size": 3}}), "names layer 7 but the model has 4 layers"),
        (dict(per_layer_config={0: {"hidden_size": 3}}), "only .* may vary per layer"),
        (dict(head_dim=15), "head_dim must be a positive even number"),
    ],
)
def test_invalid_configs(kwargs, message):
    with pytest.raises(EfficientLLMConfigError, match=message) as err:
        tiny_config(**kwargs)
    assert isinstance(err.value, EffllmError)  # effllm's commands report it in one line, exit 2


def test_global_per_layer_read_is_refused():
    from transformers.integrations.heterogeneity.configuration_utils import (
        AmbiguousGlobalPerLayerAttributeError,
    )

    config = tiny_config(**IRREGULAR)
    with pytest.raises(AmbiguousGlobalPerLayerAttributeError):
        _ = config.intermediate_size
    assert config.per_layer_config[2].intermediate_size == 17


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_parameter_accounting(tied, bias):
    model = tiny_model(**IRREGULAR, tie_word_embeddings=tied, attention_bias=bias)
    count = count_parameters(model.config)
    assert count.total == count_module_parameters(model)
    assert count.lm_head == (0 if tied else 512 * 64)
    assert count.ffn == 3 * 64 * (96 + 17 + 64)
    summary = architecture_summary(model.config)
    assert "    2     2    1      17" in summary and f"{count.total:,}" in summary


def test_gradient_checkpointing_and_bf16():
    model = tiny_model(**IRREGULAR).train()
    ids = torch.randint(1, 512, (2, 16))
    loss = model(ids, labels=ids).loss
    loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    loss2 = model(ids, labels=ids).loss
    loss2.backward()
    assert torch.allclose(loss, loss2)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[n], atol=1e-6), n
    bf16 = tiny_model(**IRREGULAR).to(torch.bfloat16)
    with torch.no_grad():
        logits = bf16(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
