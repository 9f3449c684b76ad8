"""--dry-run on a CPU: the fp32 memory model, and its total against a real run's peak resident set."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from effllm.model.known_sources import known_config
from effllm.training.memory import PROCESS_BYTES, cpu_activation_bytes_per_token_layer, memory
from effllm.training.recipe import TrainConfig

# The child reports its own peak resident set: RUSAGE_CHILDREN would give the largest of every child so far.
PEAK_RSS_CHILD = (
    "import resource, sys\n"
    "from effllm.cli import train_main\n"
    "code = train_main(sys.argv[1:])\n"
    "print('peak_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def test_cpu_terms_follow_their_formulas():
    config = known_config("HuggingFaceTB/SmolLM2-135M")
    cfg = TrainConfig(source="HuggingFaceTB/SmolLM2-135M", batch_size=16, seq_len=256)
    cpu, gpu = memory(config, cfg, 1, False, device="cpu"), memory(config, cfg, 1, False)
    h, q, f, v, t = 576, 9 * 64, 1536, 49152, 16 * 256
    assert cpu.activations == 30 * (24 * h + 12 * q + 8 * q + 16 * f) * t  # keys repeated to 9 heads: a q-sized copy
    assert cpu.logits == 12 * v * t and gpu.logits == 10 * v * t
    assert cpu.process == PROCESS_BYTES and gpu.process == 0
    assert cpu.total > gpu.total  # fp32 activations without autocast
    assert cpu.gradients == 4 * v * h  # the backward's peak: only the embedding's gradient exists yet
    p, largest = cpu.weights // 4, v * h  # weights are 4P
    small = memory(config, TrainConfig(source=cfg.source, batch_size=1, seq_len=8), 1, False, device="cpu")
    assert small.gradients == 4 * p + max(8 * largest, 4 * p) - small.activations - small.logits  # the step's peak
    assert cpu_activation_bytes_per_token_layer(h, 0, 0, f) == 12 * h + 16 * f  # FFN-only layer: one norm
    assert cpu_activation_bytes_per_token_layer(h, q, q, 0) == 12 * h + 12 * q + 8 * q  # no GQA: no copy


def test_cpu_plan_says_when_a_source_does_not_fit_this_machine():
    from effllm.training.dry_run import format_plan, make_plan
    from effllm.training.memory import GIB, machine_memory_gib

    cfg = TrainConfig(source="Qwen/Qwen2.5-1.5B", target_params="0.5", tokens=4096, batch_size=16, seq_len=256)
    plan = make_plan(cfg, device="cpu", tokens_per_s=50.0)
    assert plan.ddp.total > 40 * GIB  # 1.5B parameters: 16 bytes each before any activation
    too_big = plan.ddp.total > machine_memory_gib() * GIB
    assert any(n.startswith("does not fit this machine") for n in plan.notes) == too_big
    assert ("fits: no" if too_big else "fits: yes") in format_plan(plan)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux only")
def test_cpu_plan_is_within_20_percent_of_a_runs_peak(tmp_path, tokenizer, corpus):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from effllm.training.dry_run import make_plan

    torch.manual_seed(0)
    # Activations and logits of the size that decides a real run's peak, far above the process's own share.
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=1024, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )).save_pretrained(tmp_path / "source")  # fmt: skip
    tokenizer.save_pretrained(tmp_path / "source")
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for doc in corpus[:150]))
    args = ["--source", tmp_path / "source", "--data", tmp_path / "text.jsonl", "--out", tmp_path / "run",
            "--target-params", "0.8", "--tokens", "16384", "--batch-size", "16", "--seq-len", "256",
            "--eval-windows", "4", "--quiet"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, *map(str, args)], capture_output=True, text=True,
                         env=env, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    peak = int(run.stderr.split("peak_kib")[-1].split()[0]) * 1024
    from effllm.cli import parser
    from effllm.training.recipe import build_config

    cfg = build_config("quickstart", parser().parse_args([str(a) for a in args]))
    plan = make_plan(cfg, device="cpu", tokens_per_s=1000.0)
    assert plan.ddp.activations > 1.5 * plan.ddp.process  # the model's terms decide the total, not the constant
    assert abs(plan.ddp.total - peak) <= 0.2 * peak, (plan.ddp.total / 2**30, peak / 2**30)
