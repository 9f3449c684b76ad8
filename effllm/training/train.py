"""The training loop: pruning-aware pretraining, then continued pretraining of the compact model.

One loop serves every run: with a target size it prunes along a parameter budget that falls from
the source size to the target over the pruning phase (saliency moving averages are updated from
the same backward pass that trains the model, and after every prune step the least salient groups
per parameter are removed until the model fits the budget); without a target it is
plain pretraining (the quickstart's source, the from-scratch baselines). It runs on one CPU, one
GPU or under torchrun (DDP); every rank computes the same saliency from all-reduced gradients and
so makes the same decisions. Checkpoints make a resumed run bitwise equal to an uninterrupted one
(on CPU).

``train(cfg)`` runs the stages in order: the plan (effllm.training.plan), the data and run.json
(effllm.training.run_files), the state, fresh or resumed (effllm.training.run_state), the loop (``train_step``
and ``evaluate`` here; when groups are removed is effllm.training.schedules, the objective with or
without a teacher effllm.training.distill) and ``finish`` (the model, results.json and the report).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from effllm.common.fileio import staged_dir, write_json_atomic
from effllm.model.configuration_effllm import EfficientLLMConfig
from effllm.model.params import architecture_summary, count_parameters, format_count
from effllm.training import distill, schedules
from effllm.training import distributed as D
from effllm.training.plan import Plan, TrainError, plan_run, pruning_config, pruning_end, resolve_target
from effllm.training.recipe import TrainConfig
from effllm.training.run_files import RUN_MARKER, VOLATILE, JsonlLog, check_out_dir, prepare_data, run_fingerprint
from effllm.training.run_state import RunState, build_optimizer, build_state, load_model_and_tokenizer, load_start

# Names other modules import from effllm.training.train (some now defined in the modules above).
__all__ = [
    "RUN_MARKER",
    "VOLATILE",
    "JsonlLog",
    "Plan",
    "RunState",
    "StopRequested",
    "TrainError",
    "build_optimizer",
    "check_out_dir",
    "heldout_loss",
    "load_model_and_tokenizer",
    "lr_at",
    "param_breakdown",
    "pruning_end",
    "resolve_target",
    "run_fingerprint",
    "train",
]


# ---- learning rate ----------------------------------------------------------------------------
def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine, warmup-stable-decay (last 20% decays) or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "wsd":
        decay_start = 0.8
        if progress < decay_start:
            return cfg.lr
        return cfg.lr - (cfg.lr - floor) * (progress - decay_start) / (1 - decay_start)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


# ---- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def heldout_loss(model, heldout_path, dtype, seq_len: int, max_windows: int, device, autocast) -> float:
    """Mean next-token loss on the first ``max_windows`` held-out windows (deterministic)."""
    from effllm.data.token_batches import evaluate_batches

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in evaluate_batches(heldout_path, dtype, seq_len, max_windows=max_windows):
        for chunk in batch.split(8):
            chunk = chunk.to(device)
            with autocast():
                logits = model(chunk[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
            total += loss.item()
            count += chunk[:, 1:].numel()
    model.train(was_training)
    return total / max(count, 1)


def param_breakdown(config: EfficientLLMConfig) -> dict:
    count = count_parameters(config)
    return {
        "params": count.total,
        "attention_params": count.attention,
        "ffn_params": count.ffn,
        "embedding_params": count.embedding + count.lm_head,
        "hidden_size": config.hidden_size,
        "heads": sum(h for h, _, _ in config.layer_shapes()),
        "ffn_width": sum(f for _, _, f in config.layer_shapes()),
    }


def evaluate(state: RunState, step: int, tokens: int) -> float:
    """The held-out loss now, appended to evals.jsonl as of ``step``/``tokens``."""
    hl = heldout_loss(state.model, *state.eval_args)
    state.evals.write([{"step": step, "tokens": tokens, "heldout_loss": hl, "heldout_ppl": math.exp(hl),
                        **param_breakdown(state.model.config)}])  # fmt: skip
    return hl


# ---- one step -------------------------------------------------------------------------------------
class StopRequested:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the step and exits."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def backward_pass(state: RunState, batches: list[torch.Tensor], distiller) -> float:
    """Forward and backward of every micro-batch (gradients accumulate; DDP syncs on the last one); the mean loss."""
    cfg, info = state.cfg, state.info
    mean_loss = 0.0
    for micro, batch in enumerate(batches):
        sync = contextlib.nullcontext()
        if info.enabled and micro < len(batches) - 1:
            sync = state.net.no_sync()
        with sync:
            loss = distill.training_loss(state.net, batch, state.autocast, distiller)
            (loss / cfg.grad_accum).backward()
        mean_loss += loss.item() / cfg.grad_accum
        # Drop the graph now: its AccumulateGrad nodes remember parameter shapes, and
        # surgery in a prune step changes them (a live node would reject the next backward's grads).
        del loss
    return mean_loss


def train_step(state: RunState) -> tuple[float, torch.Tensor]:
    """One optimizer step over ``grad_accum`` micro-batches (in the pruning phase the saliency is updated
    from the same gradients, or with --distill from a next-token-loss pass of its own); returns the step's
    mean loss and its last micro-batch."""
    cfg, plan, optimizer = state.cfg, state.plan, state.optimizer
    for group in optimizer.param_groups:
        group["lr"] = lr_at(state.step, plan.total_steps, cfg)
    state.model.train()
    batches = [state.stream.next_batch().to(state.device) for _ in range(cfg.grad_accum)]
    saliency = schedules.tracks_saliency(state)
    if saliency and state.distill is not None:
        # The KD gradient vanishes while the student still equals its teacher (the source), so it says
        # nothing about which groups matter: the saliency comes from the model's own next-token loss on
        # the same batches, in a pass of its own (what one-shot calibration measures too).
        backward_pass(state, batches, None)
        state.pruner.update_saliency(tokens=plan.tokens_per_step)
        optimizer.zero_grad(set_to_none=True)
    step_loss = backward_pass(state, batches, state.distill)
    if saliency and state.distill is None:
        state.pruner.update_saliency()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens_seen += plan.tokens_per_step
    return step_loss, batches[-1]


# ---- the loop -------------------------------------------------------------------------------------
def announce(state: RunState) -> None:
    plan = state.plan
    print(architecture_summary(state.model.config), flush=True)
    if plan.target_params:
        total = plan.total_steps * plan.tokens_per_step
        # the one-shot and staged removals say when they happen on the schedule line below
        over = f" over tokens {plan.prune_start:,}..{plan.prune_end:,}," if state.cfg.schedule == "continuous" else ","
        print(f"pruning {format_count(plan.source_params)} -> {format_count(plan.target_params)}{over} "
              f"then continued pretraining to {total:,} tokens", flush=True)  # fmt: skip
        print(schedules.describe(state.cfg, state.budget), flush=True)
    if state.distill is not None:
        print(f"distilling from {state.cfg.teacher or plan.source} (T={state.distill.temperature:g}, "
              f"KD weight {state.distill.weight:g})", flush=True)  # fmt: skip


def run_loop(state: RunState) -> int:
    """Steps until the plan's last one: 0; or, on SIGTERM/SIGINT (any rank), a checkpoint and 128 + signal."""
    cfg, plan, info, ledger = state.cfg, state.plan, state.info, state.ledger
    bar = tqdm(
        total=plan.total_steps * plan.tokens_per_step, initial=state.tokens_seen, unit="tok", unit_scale=True,
        disable=cfg.quiet or not info.is_main, dynamic_ncols=True, desc="train",
    )  # fmt: skip
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    exit_code = 0
    with StopRequested() as stop:
        while state.step < plan.total_steps:
            schedules.before_step(state)  # one-shot / staged: a calibration pass and a removal when due
            step_start = time.perf_counter()
            step_loss, batch = train_step(state)
            step, tokens_seen = state.step, state.tokens_seen
            phase = schedules.phase(state)
            schedules.prune_step(state, batch)
            if state.compile_now() and not state.net_compiled:
                state.net = None
                state.make_net()  # the pruning phase has just ended
            elapsed = time.perf_counter() - step_start
            ledger["train_seconds"] += elapsed
            pt = ledger["phase_time"].setdefault(phase, [0.0, 0])
            pt[0] += elapsed
            pt[1] += plan.tokens_per_step
            window_loss += step_loss
            window_tokens += 1
            bar.update(plan.tokens_per_step)
            if step % cfg.log_every == 0 or step == plan.total_steps:
                loss_avg = D.mean_across_ranks(window_loss / window_tokens, info)
                rate = window_tokens * plan.tokens_per_step / (time.perf_counter() - window_start)
                record = {"step": step, "tokens": tokens_seen, "loss": loss_avg, "lr": state.optimizer.param_groups[0]["lr"],
                          "tokens_per_s": rate, "phase": phase, **param_breakdown(state.model.config)}  # fmt: skip
                state.metrics.write([record])
                bar.set_postfix(loss=f"{loss_avg:.3f}", params=format_count(record["params"]), tok_s=f"{rate:,.0f}")
                window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
            if step % cfg.eval_every == 0 or step == plan.total_steps:
                evaluate(state, step, tokens_seen)
            if cfg.halt_at_step is not None and step == cfg.halt_at_step:
                os.kill(os.getpid(), signal.SIGTERM)
            if D.any_rank(stop.signum is not None, info):
                state.save()
                bar.close()
                if info.is_main:
                    print(
                        f"\nstopped at step {step}; checkpoint saved in {state.out / 'checkpoint'}; continue with --resume"
                    )
                exit_code = 128 + (stop.signum or signal.SIGTERM)
                break
            if step % cfg.save_every == 0 and step < plan.total_steps:
                state.save()
    bar.close()
    return exit_code


# ---- the result -----------------------------------------------------------------------------------
def save_plain(model, tokenizer, out: Path) -> Path:
    """<out>/model-plain: the uniform result as a stock Llama/Qwen2 checkpoint (no trust_remote_code)."""
    from effllm.model.plain import to_plain

    plain_dir = out / "model-plain"
    with staged_dir(plain_dir) as tmp:
        to_plain(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return plain_dir


def finish(state: RunState) -> dict:
    """The last checkpoint, the final model in <out>/model, results.json and the report (rank 0)."""
    from effllm.data.token_batches import unigram_perplexity

    cfg, plan, info, model, ledger, data = state.cfg, state.plan, state.info, state.model, state.ledger, state.data
    state.save()
    weights_digest = D.check_same_weights(model, info) if (cfg.check_decisions or info.enabled) else None
    result = {}
    if info.is_main:
        final_loss = heldout_loss(model, *state.eval_args)
        unigram = unigram_perplexity(data.train_path, data.heldout_path, data.dtype, data.vocab_size)
        model_dir = state.out / "model"
        with staged_dir(model_dir) as tmp:
            model.save_pretrained(tmp)
            state.tokenizer.save_pretrained(tmp)
        plain_dir = save_plain(model, state.tokenizer, state.out) if cfg.shape == "uniform" else None
        phase_speed = {k: v[1] / v[0] for k, v in ledger["phase_time"].items() if v[0] > 0}
        result = {
            "source": plan.source,
            "source_params": plan.source_params,
            "target_params": plan.target_params,
            "final_params": count_parameters(model.config).total,
            "parameters": count_parameters(model.config).as_dict(),
            "layer_shapes": model.config.layer_shapes(),
            "hidden_size": model.config.hidden_size,
            "tokens": state.tokens_seen,
            "steps": state.step,
            "source_heldout_ppl": math.exp(ledger["source_heldout_loss"]),
            "final_heldout_ppl": math.exp(final_loss),
            "unigram_heldout_ppl": unigram,
            "tokens_per_s_by_phase": phase_speed,
            "train_seconds": ledger["train_seconds"],
            "world_size": info.world_size,
            "decisions_digest": ledger["decisions_digest"],
            "weights_digest": weights_digest,
            "model_dir": str(model_dir),
            "plain_model_dir": str(plain_dir) if plain_dir else None,
        }
        write_json_atomic(state.out / "results.json", result)
        from effllm.training.report import write_report

        write_report(state.out, result, state.metrics.read(), state.evals.read(), state.prune_log.read(), model.config)
        print("\n" + architecture_summary(model.config))
        print(
            f"held-out perplexity: source {result['source_heldout_ppl']:.2f}, result {result['final_heldout_ppl']:.2f}, "
            f"unigram baseline {unigram:.2f}"
        )
        print(f"model: {model_dir}   report: {state.out / 'summary.md'}")
        if plain_dir:
            print(f"plain {model.config.layer_shapes()[0]} checkpoint for stock transformers / vLLM: {plain_dir}")
    D.barrier(info)
    return result


# ---- the run --------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict:
    """Runs (or resumes) one training run; returns the final summary dict (also written to results.json)."""
    info = D.init_distributed()
    out = Path(cfg.out)
    if info.is_main:
        check_out_dir(out, cfg)
    D.barrier(info)
    # 1. the plan: model, tokenizer and every check before anything is written
    schedules.check_config(cfg)
    distill.check_config(cfg)
    start = load_start(cfg, out, info)
    pruning_cfg = pruning_config(cfg)
    plan = plan_run(cfg, start.model, start.saved_plan, pruning_cfg, info.world_size)
    distiller = distill.load_teacher(cfg, start.tokenizer, start.model.config.vocab_size, info.device)
    if info.is_main and info.device.type == "cpu":
        from effllm.training.memory import cpu_memory_warning

        warning = cpu_memory_warning(start.model.config, cfg, distiller.teacher.config if distiller else None)
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    # 2. the data, and run.json
    data = prepare_data(cfg, out, info, start.tokenizer, plan)
    # 3. the state: fresh, or the checkpoint's
    state = build_state(cfg, info, out, start, plan, pruning_cfg, data)
    state.distill = distiller
    if state.ledger["source_heldout_loss"] is None:
        state.ledger["source_heldout_loss"] = evaluate(state, 0, 0)
    if info.is_main:
        announce(state)
    # 4. the loop
    exit_code = run_loop(state)
    if exit_code:
        return {"exit_code": exit_code}
    # 5. the result
    return finish(state)
