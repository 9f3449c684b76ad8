"""Benchmark: the step time of --distill against a plain step, at the quickstart's size on CPU.

One training step as effllm-train takes it (effllm.training.distill.training_loss, backward,
gradient clipping, AdamW), with and without a frozen teacher of the quickstart source's shapes
(4 layers, hidden 256, 8/4 heads, FFN 768, vocabulary 2048; 16 x 256 tokens a step), in one
process, interleaved (plain, distill, plain, ...) so that load from other processes hits both
alike; medians over the repeats. Two students: the source's size (the start of a run, the
teacher's share is smallest) and one of about 40% of it (the quickstart's target; the end of a
run). Writes bench/results/distill_overhead.json with the load average before and after.

    python bench/distill_overhead.py                 # 12 repeats
    python bench/distill_overhead.py --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from effllm import EfficientLLMConfig, EfficientLLMForCausalLM
from effllm.common.fileio import write_json_atomic
from effllm.model.params import count_parameters, format_count
from effllm.training.distill import Distiller, training_loss
from effllm.training.recipe import TrainConfig
from effllm.training.run_state import build_optimizer

RESULTS = Path(__file__).resolve().parent / "results"
AIM = 1.6


def quickstart_model(seed: int, heads: int | None = None, kv_heads: int | None = None, ffn: int | None = None):
    cfg = TrainConfig()
    torch.manual_seed(seed)
    config = EfficientLLMConfig(
        vocab_size=cfg.source_vocab, hidden_size=cfg.source_hidden, num_hidden_layers=cfg.source_layers,
        num_attention_heads=heads or cfg.source_heads, num_key_value_heads=kv_heads or cfg.source_kv_heads,
        head_dim=cfg.source_hidden // cfg.source_heads, intermediate_size=ffn or cfg.source_ffn,
        max_position_embeddings=cfg.seq_len, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return EfficientLLMForCausalLM(config)


def time_steps(student, distill, batches, repeats: int) -> dict:
    """Median seconds of a plain and of a distilled step, interleaved, after one warm-up of each."""
    cfg = TrainConfig()
    optimizer = build_optimizer(student.train(), cfg)
    autocast = contextlib.nullcontext

    def step(d, batch) -> float:
        start = time.perf_counter()
        training_loss(student, batch, autocast, d).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(None, batches[0]), step(distill, batches[0])
    plain, kd = [], []
    for i in range(repeats):
        plain.append(step(None, batches[i % len(batches)]))
        kd.append(step(distill, batches[i % len(batches)]))
    p, k = statistics.median(plain), statistics.median(kd)
    return {"plain_s": p, "distill_s": k, "ratio": k / p, "plain_all_s": plain, "distill_all_s": kd}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=RESULTS / "distill_overhead.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig()
    load_before = os.getloadavg()
    teacher = quickstart_model(1).eval().requires_grad_(False)
    distill = Distiller(teacher, temperature=1.0, weight=1.0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.source_vocab, (cfg.batch_size, cfg.seq_len + 1), generator=g) for _ in range(4)]
    students = {"source size": quickstart_model(0), "~40% (heads 4/2, FFN 256)": quickstart_model(0, 4, 2, 256)}
    rows = {}
    for name, student in students.items():
        r = rows[name] = {"params": count_parameters(student.config).total,
                          **time_steps(student, distill, batches, args.repeats)}  # fmt: skip
        r["meets_aim"] = r["ratio"] <= AIM
        print(f"student {name:28} {format_count(r['params']):>7}: plain {r['plain_s'] * 1e3:7.1f} ms, "
              f"distill {r['distill_s'] * 1e3:7.1f} ms, ratio {r['ratio']:.2f}", flush=True)  # fmt: skip
    result = {
        "what": "median step time (forward, backward, clip, AdamW) with --distill vs without, quickstart shapes, CPU",
        "teacher_params": count_parameters(teacher.config).total,
        "tokens_per_step": cfg.batch_size * cfg.seq_len,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "aim_ratio": AIM,
        "students": rows,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    write_json_atomic(args.out, result)
    print(f"load average before {load_before[0]:.2f}, after {result['load_average_after'][0]:.2f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
