"""ExecuTorch export of uniform and irregular models: the Runtime and TextLLMRunner against torch."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model
from effllm.export.executorch_export import export_executorch, quantize_8da4w_
from effllm.export.verify import QUANTIZED_THRESHOLDS
from effllm.runtime.executorch_backend import ExecuTorchBackend
from export_helpers import (
    CLI_MAX_SEQ_LEN,
    MAX_SEQ_LEN,
    PROMPTS,
    before_eos,
    cli_export_of_trained_model,
    encode,
    heldout_windows,
    random_model_dir,
    top1_and_ppl_change,
    torch_greedy,
    trained_model_dir,
)
from tokenizers import Tokenizer

from effllm import EfficientLLMForCausalLM

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


@pytest.fixture(scope="module", params=["uniform", "irregular", "odd"])
def exported(request, tokenizer, corpus, tmp_path_factory):
    """(torch model, model dir, .pte path, max_seq_len); "irregular" is the trained model exported by the CLI."""
    if request.param == "irregular":
        model_dir = trained_model_dir(tokenizer, corpus)
        pte, max_seq_len = (
            cli_export_of_trained_model(tokenizer, corpus).out / "executorch" / "model.pte",
            CLI_MAX_SEQ_LEN,
        )
    else:
        _, model_dir = random_model_dir(request.param, tokenizer)
        out = tmp_path_factory.mktemp(f"pte-{request.param}")
        pte = export_executorch(
            EfficientLLMForCausalLM.from_pretrained(model_dir), out, MAX_SEQ_LEN, model_dir=model_dir
        )
        max_seq_len = MAX_SEQ_LEN
    assert (pte.parent / "tokenizer.json").is_file()
    return EfficientLLMForCausalLM.from_pretrained(model_dir).eval(), model_dir, pte, max_seq_len


def _forward(pte):
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(str(pte))
    return program, program.load_method("forward")


def test_runtime_prefill_and_decode_match_torch(exported):
    """Prefill, 6 decode steps through the in-place KV buffers, then a new prompt from position 0."""
    model, _, pte, _ = exported
    _, forward = _forward(pte)
    torch.manual_seed(2)
    for prompt_len in (11, 5):  # the second sequence reuses the cache buffers the first one filled
        ids = torch.randint(1, model.config.vocab_size, (1, prompt_len + 6))
        with torch.no_grad():
            expected = model(ids).logits
        prefill = forward.execute([ids[:, :prompt_len], torch.arange(prompt_len)])[0]
        assert prefill.shape == (1, 1, model.config.vocab_size)  # the last position's logits only
        got = [prefill]
        for t in range(prompt_len, ids.shape[1]):
            got.append(forward.execute([ids[:, t : t + 1], torch.tensor([t])])[0])
        got = torch.cat(got, dim=1)
        expected = expected[:, prompt_len - 1 :]
        diff = (got - expected).abs().max().item()
        assert diff <= 1e-4, diff
        assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_constant_methods_for_the_llm_runner(exported):
    model, _, pte, max_seq_len = exported
    program, _ = _forward(pte)
    expected = {
        "get_max_seq_len": max_seq_len,
        "get_max_context_len": max_seq_len,
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
        "get_bos_id": model.config.bos_token_id,
        "get_vocab_size": model.config.vocab_size,
    }
    for name, value in expected.items():
        assert program.load_method(name).execute([])[0] == value, name
    assert list(program.load_method("get_eos_ids").execute([])) == [model.config.eos_token_id]


def test_text_llm_runner_greedy_text_equals_torch(exported):
    """The C++ runner that Android's LlmModule wraps, reading our constant methods and tokenizer.json."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    model, model_dir, pte, _ = exported
    tokenizer = Tokenizer.from_file(str(pte.parent / "tokenizer.json"))
    runner = TextLLMRunner(str(pte), str(pte.parent / "tokenizer.json"))
    new_tokens = 20
    for text in PROMPTS:
        pieces: list[str] = []
        runner.reset()
        runner.generate(text, GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, echo=False), pieces.append)
        expected = before_eos(torch_greedy(model, encode(model_dir, text), new_tokens), model.config.eos_token_id)
        assert "".join(pieces) == tokenizer.decode(expected), text
        assert expected  # a non-empty comparison


def test_8da4w_falls_back_to_per_channel_for_odd_input_widths(tokenizer, corpus):
    model = EfficientLLMForCausalLM.from_pretrained(trained_model_dir(tokenizer, corpus))
    plan = quantize_8da4w_(copy.deepcopy(model), group_size=32)
    for name, kind in plan.items():
        in_features = model.get_submodule(name).in_features
        # the output projection, v_proj, up_proj and down_proj stay at 8 bits on purpose (INT8_PROJECTIONS)
        whole_groups = in_features % 32 == 0 and name != "lm_head" and not name.endswith(("v_proj", "up_proj", "down_proj"))
        assert kind == ("int4 group 32" if whole_groups else "int8 per-channel"), (name, in_features)
    assert plan["model.layers.0.self_attn.v_proj"] == plan["model.layers.0.mlp.up_proj"] == "int8 per-channel"
    every_int4 = quantize_8da4w_(copy.deepcopy(model), group_size=32, int8_projections=())
    assert every_int4["model.layers.0.self_attn.v_proj"] == every_int4["model.layers.0.mlp.up_proj"] == "int4 group 32"
    assert plan["model.layers.0.mlp.down_proj"] == "int8 per-channel"  # FFN width 40
    assert plan["model.layers.1.mlp.down_proj"] == "int8 per-channel"  # FFN width 80
    assert plan["model.layers.0.self_attn.q_proj"] == "int4 group 32"
    assert plan["lm_head"] == "int8 per-channel"


def pte_operators(pte) -> set[str]:
    """The operators a .pte's forward calls outside its delegates."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte.read_bytes())
    program = getattr(program, "program", program)
    return {op.name for op in program.execution_plan[0].operators}


def test_8da4w_embedding_of_a_hidden_size_off_the_group_is_int8_per_row(tmp_path):
    """Stem pruning leaves hidden sizes like 72: the embedding (int8 per row at any size) runs as ExecuTorch's
    embedding_byte."""
    model = tiny_model(hidden_size=72, num_hidden_layers=2)
    pte = export_executorch(model, tmp_path, MAX_SEQ_LEN, "8da4w")
    operators = pte_operators(pte)
    assert "quantized_decomposed::embedding_byte" in operators and "aten::embedding" not in operators
    ids = list(range(5, 30))
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    got = torch.from_numpy(ExecuTorchBackend(pte).forward_all(ids, 0))  # every position: one token per call
    assert 1e-4 < (got - expected).abs().max() < 0.5  # quantized, and close


def test_8da4w_within_thresholds_and_runs_in_the_llm_runner(tokenizer, corpus):
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    run = cli_export_of_trained_model(tokenizer, corpus)
    model_dir = trained_model_dir(tokenizer, corpus)
    model = EfficientLLMForCausalLM.from_pretrained(model_dir).eval()
    pte = run.out / "executorch-8da4w" / "model.pte"
    assert pte.stat().st_size < 0.6 * (run.out / "executorch" / "model.pte").stat().st_size
    # The token lookup reads an int8 table, not the fp32 embedding (which would be most of the file).
    operators = pte_operators(pte)
    assert "quantized_decomposed::embedding_byte" in operators and "aten::embedding" not in operators
    backend = ExecuTorchBackend(pte)

    def run_window(ids):  # every position's logits: one token per call (the program returns the last one's)
        return torch.from_numpy(backend.forward_all(ids, 0))

    windows = heldout_windows(model_dir, 100)
    top1, ppl_change = top1_and_ppl_change(model, windows, run_window)
    limits = QUANTIZED_THRESHOLDS["8da4w"]
    assert top1 >= limits["min_top1_agreement"], top1
    assert ppl_change <= limits["max_ppl_increase"], ppl_change
    with torch.no_grad():  # really quantized, not a copy of fp32
        assert (run_window(windows[0]) - model(torch.tensor([windows[0]])).logits[0]).abs().max() > 1e-3

    pieces: list[str] = []
    runner = TextLLMRunner(str(pte), str(pte.parent / "tokenizer.json"))
    runner.generate(PROMPTS[0], GenerationConfig(max_new_tokens=10, temperature=0.0, echo=False), pieces.append)
    assert "".join(pieces).strip()
