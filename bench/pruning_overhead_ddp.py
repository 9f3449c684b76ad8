"""Benchmark: one prune step against one training step under DDP (torchrun, 2 gloo ranks, CPU).

A ~100M-parameter source (d=768, 12 layers, 12 heads / 4 KV heads, FFN 3072, vocab 16,384) is
trained as effllm-train does it (DDP, AdamW, saliency update after the gradient all-reduce) and
pruned as effllm-train does it: release the DDP wrapper, ``Pruner.prune_to`` (selection and
surgery of weights, gradients, AdamW state and saliency state), compare the decisions across
ranks, and wrap the pruned model in a new DDP (which broadcasts rank 0's parameters). Every part
is timed on every rank; the slowest rank counts. Each prune step removes ``--prune-fraction`` of
the parameters, as the paper's recipe does per step only when its budget falls that fast (it
falls ~1.24B/7,153 steps = 0.02% per step; a smaller step costs less surgery).

    python bench/pruning_overhead_ddp.py            # launches itself under torchrun, 2 ranks
    python bench/pruning_overhead_ddp.py --steps 2 --prunes 1   # quicker

Writes bench/results/pruning_overhead_ddp.json. Runs a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=768, help="hidden size (default: 768)")
    ap.add_argument("--layers", type=int, default=12, help="layers (default: 12)")
    ap.add_argument("--heads", type=int, default=12, help="query heads (default: 12)")
    ap.add_argument("--kv-heads", type=int, default=4, help="KV heads (default: 4)")
    ap.add_argument("--ffn", type=int, default=3072, help="FFN width (default: 3072)")
    ap.add_argument("--vocab", type=int, default=16384, help="vocabulary (default: 16384)")
    ap.add_argument("--seq", type=int, default=128, help="sequence length (default: 128)")
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank and step (default: 2)")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps (default: 3, after 1 warm-up)")
    ap.add_argument("--prunes", type=int, default=2, help="timed prune steps (default: 2)")
    ap.add_argument("--prune-fraction", type=float, default=0.01, help="parameters removed per prune step (0.01)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks torchrun starts (default: 2)")
    ap.add_argument("--out", type=Path, default=RESULTS / "pruning_overhead_ddp.json", help="result JSON")
    return ap.parse_args(argv)


def launch(args, argv) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), "--master-port",
           "29561", str(Path(__file__).resolve()), *argv]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, env=env).returncode


def rank_main(args) -> int:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from effllm import EfficientLLMConfig, EfficientLLMForCausalLM
    from effllm.common.fileio import write_json_atomic
    from effllm.model.params import count_parameters, format_count
    from effllm.pruning import Pruner, PruningConfig
    from effllm.training import distributed as D
    from effllm.training.recipe import TrainConfig
    from effllm.training.train import build_optimizer

    torch.set_num_threads(1)
    info = D.init_distributed()
    torch.manual_seed(0)
    config = EfficientLLMConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        intermediate_size=args.ffn, max_position_embeddings=max(256, args.seq), tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    model = EfficientLLMForCausalLM(config).train()
    params = count_parameters(model.config).total
    optimizer = build_optimizer(model, TrainConfig())
    pruner = Pruner(model, PruningConfig(), optimizer=optimizer)
    gen = torch.Generator().manual_seed(1 + info.rank)

    def make_net():
        return torch.nn.parallel.DistributedDataParallel(model)

    def train_step(net) -> float:
        t0 = time.perf_counter()
        batch = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
        logits = net(batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        del logits, loss
        pruner.update_saliency()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def slowest(x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    net = make_net()
    if info.is_main:
        print(f"model: {format_count(params)} parameters; {info.world_size} ranks, batch {args.batch} x {args.seq}",
              flush=True)  # fmt: skip
    train_step(net)  # warm-up: AdamW state, allocator, DDP buckets
    steps = []
    for i in range(args.steps):
        steps.append(slowest(train_step(net)))
        if info.is_main:
            print(f"  train step {i + 1}: {steps[-1]:.2f} s", flush=True)
    prunes = []
    for i in range(args.prunes):
        # as train.py: the prune step follows a training step whose gradients were consumed
        before = count_parameters(model.config).total
        t0 = time.perf_counter()
        net = None
        gc.collect()
        t1 = time.perf_counter()
        records = pruner.prune_to(int(before * (1 - args.prune_fraction)), step=i, tokens=i)
        t2 = time.perf_counter()
        D.check_same_decisions(records, info)
        t3 = time.perf_counter()
        net = make_net()
        t4 = time.perf_counter()
        after_step = train_step(net)  # the first step after a rebuild (DDP re-buckets)
        part = {"release_s": t1 - t0, "prune_to_s": t2 - t1, "check_decisions_s": t3 - t2, "ddp_rebuild_s": t4 - t3,
                "first_step_after_s": after_step, "groups": len(records),
                "params_before": before, "params_after": count_parameters(model.config).total}  # fmt: skip
        part = {k: (slowest(v) if k.endswith("_s") else v) for k, v in part.items()}
        part["prune_step_s"] = part["release_s"] + part["prune_to_s"] + part["check_decisions_s"] + part["ddp_rebuild_s"]
        prunes.append(part)
        if info.is_main:
            print(f"  prune step {i + 1}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in part.items()})}",
                  flush=True)  # fmt: skip
    if info.is_main:
        train_s = statistics.median(steps)
        prune_s = statistics.median(p["prune_step_s"] for p in prunes)
        extra_first = statistics.median(p["first_step_after_s"] for p in prunes) - train_s
        result = {
            "model": {"parameters": params, "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                      "kv_heads": args.kv_heads, "ffn": args.ffn, "vocab": args.vocab},  # fmt: skip
            "world_size": info.world_size, "backend": "gloo", "device": "cpu", "threads_per_rank": 1,
            "batch_per_rank": args.batch, "seq": args.seq, "tokens_per_step": args.batch * args.seq * info.world_size,
            "train_step_s": steps, "train_step_median_s": train_s,
            "prune_steps": prunes, "prune_step_median_s": prune_s,
            "first_step_after_prune_extra_s": extra_first,
            "prune_over_train_ratio": prune_s / train_s,
            "load_average": os.getloadavg(),
        }  # fmt: skip
        write_json_atomic(args.out, result, indent=2)
        print(f"train step {train_s:.2f} s; prune step {prune_s:.2f} s ({prune_s / train_s:.2f} train steps); "
              f"first step after a prune +{extra_first:.2f} s; wrote {args.out}")  # fmt: skip
    D.shutdown_if_initialized()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if "LOCAL_RANK" not in os.environ:
        return launch(args, argv)
    return rank_main(args)


if __name__ == "__main__":
    sys.exit(main())
