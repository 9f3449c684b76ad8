"""Benchmark: the cost of saliency tracking and of one surgery step on a ~50M-parameter model (CPU).

A plain training step (forward, backward, AdamW step) against the same step with
``Pruner.update_saliency()`` between backward and optimizer step, measured in one run,
interleaved (plain, tracked, plain, ...) so that load from other processes hits both alike;
medians over the repeats. Also the time of ``update_saliency`` alone, and of one prune step
that removes ~1% of the parameters (selection + surgery of weights, gradients, AdamW state,
EMAs). Prints a table and writes bench/results/pruning_overhead.json.

    python bench/pruning_overhead.py                 # d=512, 12 layers, vocab 8192, seq 256, batch 4
    python bench/pruning_overhead.py --repeats 3     # quicker
    python bench/pruning_overhead.py --threads 1     # on a shared machine: with other jobs running, every
                                                     # multi-threaded op waits for a descheduled thread
"""

from __future__ import annotations

import argparse
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
from effllm.pruning import Pruner, PruningConfig

RESULTS = Path(__file__).resolve().parent / "results"


def build(args) -> EfficientLLMForCausalLM:
    torch.manual_seed(0)
    config = EfficientLLMConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        intermediate_size=args.ffn,
        max_position_embeddings=max(args.seq, 256),
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return EfficientLLMForCausalLM(config).train()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7, help="timed steps of each kind (after 2 warm-up steps)")
    ap.add_argument("--prune-fraction", type=float, default=0.01, help="share of parameters one prune step removes")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=RESULTS / "pruning_overhead.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build(args)
    params = count_parameters(model.config).total
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    pruner = Pruner(model, PruningConfig(), optimizer=opt)
    gen = torch.Generator().manual_seed(0)

    def step(track: bool) -> tuple[float, float]:
        ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        t1 = time.perf_counter()
        if track:
            pruner.update_saliency()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, t2 - t1

    print(
        f"model: {format_count(params)} parameters, batch {args.batch} x seq {args.seq}, threads {torch.get_num_threads()}"
    )
    for _ in range(2):  # warm-up: allocator, AdamW state
        step(False)
        step(True)
    plain, tracked, update = [], [], []
    for i in range(args.repeats):
        for track in (False, True) if i % 2 == 0 else (True, False):
            total, upd = step(track)
            (tracked if track else plain).append(total)
            if track:
                update.append(upd)
        print(f"  repeat {i + 1}/{args.repeats}: plain {plain[-1]:.3f}s tracked {tracked[-1]:.3f}s", flush=True)
    med_plain, med_tracked, med_update = (statistics.median(x) for x in (plain, tracked, update))

    # one prune step removing ~prune_fraction of the parameters, with pending gradients to slice
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    pruner.update_saliency()
    budget = int(params * (1 - args.prune_fraction))
    t0 = time.perf_counter()
    selection = pruner.select(budget)
    t_select = time.perf_counter() - t0
    t0 = time.perf_counter()
    records = pruner.prune_to(budget, step=0, tokens=0)
    t_prune = time.perf_counter() - t0
    after = count_parameters(model.config).total
    opt.step()  # the optimizer still works on the pruned model
    opt.zero_grad(set_to_none=True)
    types = {t: sum(r["type"] == t for r in records) for t in ("attention", "ffn", "stem")}

    result = {
        "model": {
            "parameters": params,
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "ffn": args.ffn,
            "vocab": args.vocab,
        },
        "batch": args.batch,
        "seq": args.seq,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "repeats": args.repeats,
        "plain_step_s": med_plain,
        "tracked_step_s": med_tracked,
        "update_saliency_s": med_update,
        "overhead_step_pct": 100 * (med_tracked - med_plain) / med_plain,
        "overhead_update_pct": 100 * med_update / med_plain,
        "plain_steps_s": plain,
        "tracked_steps_s": tracked,
        "prune": {
            "fraction": args.prune_fraction,
            "groups_removed": len(records),
            "by_type": types,
            "params_before": params,
            "params_after": after,
            "select_s": t_select,
            "prune_to_s": t_prune,
            "selected_groups": len(selection.choices),
        },
    }
    rows = [
        ("plain step (median)", f"{med_plain:.3f} s"),
        ("step + update_saliency (median)", f"{med_tracked:.3f} s"),
        ("update_saliency alone (median)", f"{med_update * 1000:.1f} ms"),
        ("overhead, step vs step", f"{result['overhead_step_pct']:+.1f} %"),
        ("overhead, update / plain step", f"{result['overhead_update_pct']:.1f} %"),
        (
            f"prune step: -{args.prune_fraction:.0%} ({len(records)} groups: {types})",
            f"{t_prune * 1000:.0f} ms (selection {t_select * 1000:.0f} ms)",
        ),
        ("params", f"{format_count(params)} -> {format_count(after)}"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    write_json_atomic(args.out, result, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
