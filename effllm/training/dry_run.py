"""The plan of a training run, before it starts: shapes, steps, the budget, memory per device, time.

``effllm-train ... --dry-run`` prints ``format_plan(make_plan(cfg, ...))``. It reads configs only
(no weights, no data): the source's shapes come from effllm.model.known_sources for well-known
checkpoints (offline), from config.json for a local directory, from the quickstart settings for
the embedded source, or from the hub (network) for any other id. Memory: effllm.training.memory.

Time: ``tokens / throughput``. Without a measured throughput it is estimated from FLOPs: per
token ``6 N + 6 L s q`` (N: the parameters of every matmul, the LM head included and the input
embedding lookup not; the second term is causal attention at sequence length s), at
``mfu * gpu_tflops`` per GPU. A given throughput is taken to be the source's; later phases are
scaled by the FLOPs ratio, as the model shrinks along the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from effllm.model.params import count_parameters, format_count, parse_count
from effllm.training.memory import (
    GIB,
    Memory,
    activation_bytes_per_token_layer,
    cpu_memory_warning,
    gib,
    machine_memory_gib,
    memory,
)
from effllm.training.recipe import QUICKSTART_SOURCE, RecipeError, TrainConfig

DEVICES = ("auto", "cpu", "gpu")


@dataclass
class RunPlan:
    source: str
    source_from: str
    shapes: dict
    source_params: int
    target_params: int | None
    world_size: int
    tokens_per_step: int
    total_steps: int
    total_tokens: int
    prune_start: int
    prune_end: int
    prune_steps: int
    budget_points: list[tuple[int, int]]
    ddp: Memory
    fsdp: Memory
    gpu_memory_gib: float
    seconds: float
    throughput_from: str
    notes: list[str] = field(default_factory=list)
    schedule: str = ""
    device: str = "gpu"


def source_config(cfg: TrainConfig):
    """(EfficientLLMConfig of the source, where its shapes came from); reads no weights."""
    from effllm.model.configuration_effllm import EfficientLLMConfig
    from effllm.model.known_sources import known_config, lookup

    if cfg.init_config:
        path = Path(cfg.init_config)
        try:
            return EfficientLLMConfig.from_pretrained(path if path.is_dir() else path.parent), str(path)
        except (OSError, ValueError) as err:
            raise RecipeError(f"cannot read --init-config {cfg.init_config} ({str(err).splitlines()[0]})") from None
    if cfg.source == QUICKSTART_SOURCE:
        config = EfficientLLMConfig(
            vocab_size=cfg.source_vocab, hidden_size=cfg.source_hidden, num_hidden_layers=cfg.source_layers,
            num_attention_heads=cfg.source_heads, num_key_value_heads=cfg.source_kv_heads,
            intermediate_size=cfg.source_ffn, head_dim=cfg.source_hidden // cfg.source_heads, tie_word_embeddings=True,
        )  # fmt: skip
        return config, "the quickstart settings (--source-*)"
    if not Path(cfg.source).exists():
        config = known_config(cfg.source)
        if config is not None:
            return config, f"effllm's table of known sources ({lookup(cfg.source)})"
    from effllm.model.convert import effllm_config_from_source, load_source_config

    config = effllm_config_from_source(load_source_config(cfg.source))  # local config.json, or the hub
    return config, "its config.json"


def flops_per_token(config, seq_len: int, params: int | None = None) -> float:
    """``6 N + 6 L s q``; ``params`` scales N (and attention alike) to a smaller model along the budget."""
    count = count_parameters(config)
    matmul = count.total - count.embedding + (count.embedding if config.tie_word_embeddings else 0)
    attention = sum(6 * seq_len * heads * config.head_dim for heads, _, _ in config.layer_shapes())
    scale = 1.0 if params is None else params / count.total
    return 6 * matmul * scale + attention * scale


def measure(config, cfg: TrainConfig, steps: int) -> dict:
    """Tokens/s of one device training a randomly initialised model of the source's shapes, as
    effllm-train does (fp32 weights, bf16 autocast on CUDA, AdamW), over ``steps`` micro-batches
    after one warm-up; and the peak memory that took (on CUDA the allocator's, on a CPU the process's
    resident set). Scaled by the world size it assumes
    DDP scales linearly (gradient all-reduce overlapped with backward)."""
    import time

    import torch
    import torch.nn.functional as F

    from effllm.model.modeling_effllm import EfficientLLMForCausalLM
    from effllm.training.train import build_optimizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    torch.manual_seed(0)
    model = EfficientLLMForCausalLM(config).to(device).train()
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    optimizer = build_optimizer(model, cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        batch = torch.randint(0, config.vocab_size, (cfg.batch_size, cfg.seq_len + 1), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(batch[:, :-1], use_cache=False).logits
        F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "tokens_per_s": steps * cfg.batch_size * cfg.seq_len / seconds,
        "peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss(),
    }


def plan_device(device: str, world_size: int) -> str:
    """ "cpu" or "gpu": ``auto`` plans for a GPU where one is visible or several processes are planned."""
    if device not in DEVICES:
        raise RecipeError(f"--plan-device {device!r} is not one of {DEVICES}")
    if device != "auto":
        return device
    import torch

    return "gpu" if torch.cuda.is_available() or world_size > 1 else "cpu"


def _peak_rss() -> int | None:
    """This process's peak resident set so far (Linux reports KiB, macOS bytes); None elsewhere."""
    import resource
    import sys

    try:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (AttributeError, OSError):
        return None
    return peak if sys.platform == "darwin" else peak * 1024


def make_plan(cfg: TrainConfig, world_size: int = 1, tokens_per_s: float | None = None, gpu_tflops: float = 989.0,
              mfu: float = 0.35, gpu_memory_gib: float = 80.0, measure_steps: int | None = None,
              device: str = "auto") -> RunPlan:  # fmt: skip
    """Everything ``--dry-run`` prints; raises RecipeError (or the source's error) on bad input.

    ``measure_steps`` None: one timed micro-batch on a CPU plan without ``tokens_per_s`` (a FLOP
    estimate for a CPU means nothing), none on a GPU plan."""
    from dataclasses import replace

    from effllm.pruning import ParameterBudget
    from effllm.training import distill, schedules
    from effllm.training.train import pruning_end, resolve_target

    schedules.check_config(cfg)
    distill.check_config(cfg)
    device = plan_device(device, world_size)
    if measure_steps is None:
        measure_steps = 1 if device == "cpu" and not tokens_per_s else 0
    if device == "cpu":
        gpu_memory_gib = machine_memory_gib()
    config, where = source_config(cfg)
    teacher = None
    if cfg.distill:
        teacher = source_config(replace(cfg, source=cfg.teacher, init_config=None))[0] if cfg.teacher else config
    count = count_parameters(config)
    source_params = count.total
    notes: list[str] = []
    target = resolve_target(cfg.target_params, source_params, None)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world_size
    total_steps = max(1, math.ceil(cfg.tokens / tokens_per_step))
    prune_end = pruning_end(cfg, target)
    prune_tokens = prune_end - cfg.prune_start
    curve = getattr(cfg, "budget_curve", "linear")
    points: list[tuple[int, int]] = []
    prune_steps, schedule = 0, ""
    params_at = lambda t: source_params  # noqa: E731
    if target is not None:
        budget = ParameterBudget(source_params, target, cfg.prune_start, prune_end, curve)
        marks = [0, cfg.prune_start] + [cfg.prune_start + prune_tokens * i // 4 for i in (1, 2, 3)] + [prune_end]
        points = [(t, budget.budget(t)) for t in sorted(set(marks))]
        first = cfg.prune_start // tokens_per_step
        last = math.ceil(prune_end / tokens_per_step)
        prune_steps = max(0, last - first) // max(cfg.prune_every, 1)
        params_at = budget.budget
        schedule, stages = schedules.describe(cfg, budget), schedules.removals(cfg, budget)
        if stages:  # one-time removals: the size steps down at each
            points, prune_steps = [(0, source_params), *stages], len(stages)
            params_at = lambda t: min([source_params] + [p for s, p in stages if s <= t])  # noqa: E731
    # time: integrate FLOPs along the budget (64 slices of the run)
    source_flops = flops_per_token(config, cfg.seq_len)
    slices, seconds = 64, 0.0
    if measure_steps > 0:
        measured = measure(config, cfg, measure_steps)
        tokens_per_s = measured["tokens_per_s"] * world_size
        peak = measured["peak_bytes"]
        notes.append(
            f"measured {measured['tokens_per_s']:,.0f} tokens/s on one device ({measured['device']}, "
            f"{measure_steps} micro-batches, random weights)"
            + (
                f"; peak memory {peak / GIB:.1f} GiB ({'this process' if device == 'cpu' else 'allocated on the GPU'}"
                f", to compare with the estimate above)"
                if peak
                else ""
            )
        )
        throughput_from = (
            f"measured on this machine's {measured['device']}: {measured['tokens_per_s']:,.0f} tokens/s at the "
            f"source's shapes x {world_size}, faster as the model shrinks"
        )
    if tokens_per_s:
        rate_at_source = tokens_per_s
        if not measure_steps:
            throughput_from = f"--assume-tokens-per-s {tokens_per_s:,.0f} (for the source)"
    else:
        rate_at_source = mfu * gpu_tflops * 1e12 * world_size / source_flops
        throughput_from = f"estimated: {world_size} GPU(s) x {gpu_tflops:g} TFLOP/s x MFU {mfu:g}"
    for i in range(slices):
        t = (i + 0.5) * cfg.tokens / slices
        params = params_at(int(t))
        rate = rate_at_source * source_flops / flops_per_token(config, cfg.seq_len, params)
        seconds += cfg.tokens / slices / rate
    if cfg.source == QUICKSTART_SOURCE and not cfg.init_config:
        pretrain = cfg.source_tokens / rate_at_source
        seconds += pretrain
        notes.append(f"the time includes pretraining the embedded source first ({cfg.source_tokens:,} tokens, "
                     f"{_duration(pretrain)}) unless <out>/source already holds it")  # fmt: skip
    ddp, fsdp = memory(config, cfg, world_size, False, teacher, device), memory(config, cfg, world_size, True, teacher)
    limit = gpu_memory_gib * GIB
    if device == "cpu" and ddp.total > limit:
        notes.append(
            f"does not fit this machine's {gpu_memory_gib:.0f} GiB: the run would swap or be killed; lower "
            "--batch-size and raise --grad-accum (same tokens per step), add --gradient-checkpointing, or use a GPU"
        )
    elif ddp.total > limit and not cfg.gradient_checkpointing:
        notes.append("DDP does not fit at this micro-batch: add --gradient-checkpointing, or lower --batch-size "
                     "and raise --grad-accum (same tokens per step)")  # fmt: skip
    if ddp.total > limit and fsdp.total <= limit:
        notes.append("FSDP2 would fit where DDP does not; effllm trains with DDP today (see docs/scale.md)")
    if ddp.logits > ddp.activations:
        notes.append("the logits are the largest activation: a smaller --batch-size with more --grad-accum helps most")
    shapes = {
        "vocab": config.vocab_size, "hidden": config.hidden_size, "layers": config.num_hidden_layers,
        "heads": config.layer_shapes()[0][0], "kv_heads": config.layer_shapes()[0][1], "head_dim": config.head_dim,
        "ffn": config.layer_shapes()[0][2], "tied_embeddings": bool(config.tie_word_embeddings),
    }  # fmt: skip
    return RunPlan(
        source=cfg.init_config or cfg.source, source_from=where, shapes=shapes, source_params=source_params,
        target_params=target, world_size=world_size, tokens_per_step=tokens_per_step, total_steps=total_steps,
        total_tokens=total_steps * tokens_per_step, prune_start=cfg.prune_start, prune_end=prune_end,
        prune_steps=prune_steps, budget_points=points, ddp=ddp, fsdp=fsdp, gpu_memory_gib=gpu_memory_gib,
        seconds=seconds, throughput_from=throughput_from, notes=notes, schedule=schedule, device=device,
    )  # fmt: skip


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_plan(plan: RunPlan) -> str:
    s = plan.shapes
    lines = [
        f"source: {plan.source} (shapes from {plan.source_from})",
        f"  {format_count(plan.source_params)} parameters: vocab {s['vocab']:,}, hidden {s['hidden']}, "
        f"{s['layers']} layers, {s['heads']} heads / {s['kv_heads']} KV heads of {s['head_dim']}, FFN {s['ffn']}, "
        f"{'tied' if s['tied_embeddings'] else 'untied'} embeddings",
    ]
    if plan.target_params is None:
        lines.append("target: none (plain pretraining, no pruning)")
    else:
        lines.append(
            f"target: {format_count(plan.target_params)} parameters ({plan.target_params / plan.source_params:.0%} "
            "of the source); per-layer shapes are decided by saliency during the run"
        )
    lines += [
        f"steps: {plan.total_steps:,} of {plan.tokens_per_step:,} tokens ({plan.world_size} device(s)); "
        f"{plan.total_tokens:,} tokens in all",
    ]
    if plan.budget_points:
        lines.append(
            f"pruning: tokens {plan.prune_start:,}..{plan.prune_end:,}, {plan.prune_steps:,} prune steps; "
            "the budget (parameters allowed) at:"
        )
        lines += [f"  {t:>18,} tokens: {format_count(p)}" for t, p in plan.budget_points]
        lines.append(plan.schedule)
    if plan.device == "cpu":
        lines.append(f"memory at the peak (the source; fp32 on the CPU, resident set), this machine "
                     f"{plan.gpu_memory_gib:.1f} GiB:")  # fmt: skip
        for name in (
            "weights",
            "gradients",
            "adamw",
            "saliency",
            "activations",
            "logits",
            "teacher",
            "process",
            "total",
        ):
            lines.append(f"  {name:22}{gib(getattr(plan.ddp, name)):>12}")
        lines.append(f"  fits: {'yes' if plan.ddp.total <= plan.gpu_memory_gib * GIB else 'no'}")
    else:
        lines.append(f"memory per device at the peak (the source), limit {plan.gpu_memory_gib:g} GiB:")
        lines.append(f"  {'':22}{'DDP':>12}{'FSDP2':>12}")
        for name in ("weights", "gradients", "adamw", "saliency", "activations", "logits", "ddp_buckets",
                     "fsdp_working_set", "teacher", "total"):  # fmt: skip
            a, b = getattr(plan.ddp, name), getattr(plan.fsdp, name)
            lines.append(f"  {name.replace('_', ' '):22}{gib(a):>12}{gib(b):>12}")
        fits = {k: m.total <= plan.gpu_memory_gib * GIB for k, m in (("DDP", plan.ddp), ("FSDP2", plan.fsdp))}
        lines.append("  fits: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in fits.items()))
    lines.append(f"time: {_duration(plan.seconds)} ({plan.throughput_from})")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


__all__ = [
    "Memory",
    "RunPlan",
    "activation_bytes_per_token_layer",
    "cpu_memory_warning",
    "machine_memory_gib",
    "make_plan",
    "plan_device",
    "format_plan",
    "memory",
    "flops_per_token",
    "parse_count",
]
