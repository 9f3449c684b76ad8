"""Benchmark: torch.compile while pruning changes the model's shapes (toy size, CPU).

A toy model is trained for ``--prune-steps`` steps with a prune step after each (as the paper's
recipe does), then ``--after`` steps at the final size, under three policies:

* ``eager``: no compilation;
* ``always``: the model compiled from the start and compiled again after every prune step, as
  effllm-train's ``make_net`` did before (a new ``torch.compile`` wrapper around the pruned model);
* ``after-pruning``: eager while pruning, compiled once when the pruning phase ends (the policy
  effllm-train now follows).

For each: dynamo's frame compilations, recompilations and the wall time of the prune phase and
of the steps after it. ``--backend aot_eager`` counts recompilations cheaply; ``inductor`` (the
default of torch.compile) also measures what each compilation costs. Writes
bench/results/compile_policy.json.

    python bench/compile_policy.py                      # inductor, 12 prune steps, 12 steps after
    python bench/compile_policy.py --backend aot_eager  # quicker: counts only
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run(policy: str, args) -> dict:
    import torch
    import torch._dynamo
    import torch.nn.functional as F
    from torch._dynamo.utils import counters

    from effllm import EfficientLLMConfig, EfficientLLMForCausalLM
    from effllm.model.params import count_parameters
    from effllm.pruning import Pruner, PruningConfig
    from effllm.training.recipe import TrainConfig
    from effllm.training.train import build_optimizer

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    config = EfficientLLMConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    model = EfficientLLMForCausalLM(config).train()
    optimizer = build_optimizer(model, TrainConfig())
    pruner = Pruner(model, PruningConfig(), optimizer=optimizer)
    source = count_parameters(model.config).total
    gen = torch.Generator().manual_seed(0)

    def wrap(compile_now: bool):
        return torch.compile(model, backend=args.backend) if compile_now else model

    def step(net) -> None:
        batch = torch.randint(0, 512, (4, 33), generator=gen)
        logits = net(batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        del logits, loss
        pruner.update_saliency()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    net = wrap(policy == "always")
    t0 = time.perf_counter()
    for i in range(args.prune_steps):
        step(net)
        net = None
        budget = source - (source - int(source * args.target)) * (i + 1) // args.prune_steps
        pruner.prune_to(budget, step=i, tokens=i)
        net = wrap(policy == "always")
    t_prune = time.perf_counter() - t0
    frames_prune = counters["stats"]["unique_graphs"]
    net = wrap(policy != "eager")
    t0 = time.perf_counter()
    first = None
    for _ in range(args.after):
        s = time.perf_counter()
        step(net)
        first = first if first is not None else time.perf_counter() - s
    t_after = time.perf_counter() - t0
    return {
        "policy": policy,
        "backend": args.backend,
        "params": [source, count_parameters(model.config).total],
        "graphs_compiled_in_prune_phase": frames_prune,
        "graphs_compiled_in_all": counters["stats"]["unique_graphs"],
        "recompiles": dict(counters["recompiles"]),
        "prune_phase_s": t_prune,
        "after_phase_s": t_after,
        "first_step_after_s": first,
        "steady_step_after_s": (t_after - first) / max(args.after - 1, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (default: inductor)")
    ap.add_argument("--prune-steps", type=int, default=12, help="training steps, each followed by a prune step")
    ap.add_argument("--after", type=int, default=12, help="training steps after the pruning phase")
    ap.add_argument("--target", type=float, default=0.5, help="final size as a fraction of the source")
    ap.add_argument("--policies", default="eager,always,after-pruning", help="comma-separated policies")
    ap.add_argument("--out", type=Path, default=RESULTS / "compile_policy.json", help="result JSON")
    args = ap.parse_args(argv)
    import torch

    from effllm.common.fileio import write_json_atomic

    torch.set_num_threads(1)
    results = []
    for policy in args.policies.split(","):
        r = run(policy, args)
        results.append(r)
        print(f"{policy:>14}: graphs compiled {r['graphs_compiled_in_all']} ({r['graphs_compiled_in_prune_phase']} "
              f"while pruning), prune phase {r['prune_phase_s']:.1f} s, after: first step {r['first_step_after_s']:.2f} s, "
              f"then {r['steady_step_after_s'] * 1000:.0f} ms/step", flush=True)  # fmt: skip
    write_json_atomic(args.out, {"torch": torch.__version__, "prune_steps": args.prune_steps, "after": args.after,
                                 "load_average": os.getloadavg(), "results": results}, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
