"""The training loop: pruning-aware pretraining, then continued pretraining of the compact model.

One loop serves every run: with a target size it prunes along a parameter budget that falls from
the source size to the target over the pruning phase (saliency moving averages are updated from
the same backward pass that trains the model, and after every prune step the least salient groups
per parameter are removed until the model fits the budget); without a target it is
plain pretraining (the quickstart's source, the from-scratch baselines). It runs on one CPU, one
GPU or under torchrun (DDP); every rank computes the same saliency from all-reduced gradients and
so makes the same decisions. Checkpoints make a resumed run bitwise equal to an uninterrupted one
(on CPU).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed as D
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from .configuration_effllm import EfficientLLMConfig
from .convert import UnsupportedSourceError, from_pretrained
from .errors import EffllmError
from .fileio import staged_dir, write_atomic, write_json_atomic
from .modeling_effllm import EfficientLLMForCausalLM
from .params import architecture_summary, count_parameters, format_count, parse_count
from .recipe import TrainConfig


class TrainError(EffllmError):
    """Bad input for a training run: one line naming the problem and the fix (the CLI exits 2)."""


RUN_MARKER = "run.json"
# Settings that do not change what a run computes (bookkeeping, and how the data is tokenized):
# --resume may change them, and they are not part of the run's fingerprint.
VOLATILE = ("resume", "overwrite", "quiet", "halt_at_step", "check_decisions", "save_every", "log_every", "num_proc",
            "shard_chars")  # fmt: skip


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


# ---- optimizer ----------------------------------------------------------------------------------
def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with decay on matrices only; groups in named_parameters order, so a resumed model
    (built from the checkpoint's pruned config) lines up with the saved optimizer state."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


# ---- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def heldout_loss(model, heldout_path, dtype, seq_len: int, max_windows: int, device, autocast) -> float:
    """Mean next-token loss on the first ``max_windows`` held-out windows (deterministic)."""
    from .data import evaluate_batches

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


# ---- run bookkeeping ----------------------------------------------------------------------------
@dataclass
class Plan:
    """Numbers fixed at the start of a run and kept in run.json."""

    source: str
    source_params: int
    target_params: int | None
    tokens_per_step: int
    total_steps: int
    prune_start: int
    prune_end: int


def run_fingerprint(cfg: TrainConfig) -> str:
    """What makes two invocations 'the same run' (so --resume and re-runs can be told from a new run)."""
    keys = asdict(cfg)
    for volatile in VOLATILE:
        keys.pop(volatile, None)
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_out_dir(out: Path, cfg: TrainConfig) -> None:
    """Refuse to mix two runs in one directory unless the user says --resume or --overwrite."""
    if cfg.resume:  # a run killed before its first checkpoint has run.json only: it starts again at step 0
        if not (out / RUN_MARKER).is_file():
            raise TrainError(f"--resume: {out} holds no effllm run (no {RUN_MARKER}); check --out")
        return
    # The quickstart's cached source lives in <out>/source, and --tokenize-only writes <out>/data
    # before any run: neither is a run of its own.
    if not out.exists() or not [p for p in out.iterdir() if p.name not in ("source", "data")] or cfg.overwrite:
        return
    marker = out / RUN_MARKER
    what = "another effllm run" if marker.is_file() else "files that are not an effllm run"
    raise TrainError(
        f"{out} already holds {what}; pass --resume to continue it, --overwrite to replace it, or another --out"
    )


def resolve_target(target: str | None, source_params: int, min_params: int | None) -> int | None:
    if target is None:
        return None
    try:
        value = float(target)
        is_fraction = 0 < value < 1
    except ValueError:
        is_fraction = False
    try:
        target_params = int(round(float(target) * source_params)) if is_fraction else parse_count(target)
    except ValueError as err:
        raise TrainError(str(err)) from None
    if target_params >= source_params:
        raise TrainError(
            f"target {format_count(target_params)} is not smaller than the source ({format_count(source_params)}); "
            f"give a smaller --target-params"
        )
    if min_params is not None and target_params < min_params:
        raise TrainError(
            f"target {format_count(target_params)} is below what the floors allow ({format_count(min_params)}); "
            f"raise --target-params or lower --min-heads-per-layer/--min-ffn-per-layer/--min-hidden-size"
        )
    return target_params


def pruning_end(cfg: TrainConfig, target_params: int | None) -> int:
    """The token count at which the pruning phase ends; it must lie within the run."""
    prune_tokens = cfg.prune_tokens if cfg.prune_tokens is not None else int(cfg.prune_fraction * cfg.tokens)
    prune_end = cfg.prune_start + prune_tokens
    if target_params is not None and prune_end > cfg.tokens:
        raise TrainError(
            f"the pruning phase ends at {prune_end:,} tokens, after the run's {cfg.tokens:,}; "
            f"lower --prune-start/--prune-tokens or raise --tokens"
        )
    return prune_end


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


class JsonlLog:
    """Append-only JSONL, truncated on resume to records at or before the checkpoint's step."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        write_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, records: list[dict]) -> None:
        if self.enabled and records:
            with self.path.open("a") as f:
                f.writelines(json.dumps(r, default=float) + "\n" for r in records)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


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


# ---- the run --------------------------------------------------------------------------------------
def load_model_and_tokenizer(cfg: TrainConfig, out: Path, info: D.DistInfo):
    """The starting model (source import, or random init from --init-config) and its tokenizer."""
    from transformers import AutoTokenizer

    if cfg.init_config:
        path = Path(cfg.init_config)
        try:
            config = EfficientLLMConfig.from_pretrained(path if path.is_dir() else path.parent)
        except (OSError, ValueError) as err:
            raise TrainError(f"cannot read --init-config {cfg.init_config} ({str(err).splitlines()[0]})") from None
        torch.manual_seed(cfg.seed)
        model = EfficientLLMForCausalLM(config)
        tok_source = path if path.is_dir() else path.parent
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_source)
        except (OSError, ValueError):
            raise TrainError(f"--init-config {cfg.init_config}: put the tokenizer files next to config.json") from None
        return model, tokenizer
    try:
        model, tokenizer = from_pretrained(cfg.source, dtype=torch.float32)
    except UnsupportedSourceError as err:
        raise TrainError(str(err)) from None
    if tokenizer is None:
        raise TrainError(f"source {cfg.source} has no tokenizer; add tokenizer files to it")
    return model, tokenizer


def train(cfg: TrainConfig) -> dict:
    """Runs (or resumes) one training run; returns the final summary dict (also written to results.json)."""
    from .data import DataError, TokenBatches, prepare_tokens, unigram_perplexity
    from .pruning import ParameterBudget, Pruner, PruningConfig

    info = D.init_distributed()
    out = Path(cfg.out)
    if info.is_main:
        check_out_dir(out, cfg)
    D.barrier(info)

    # 1. model, tokenizer, plan (all validation before anything is written)
    resume_state = None
    checkpoint = latest_checkpoint(out)
    has_checkpoint = checkpoint is not None
    if cfg.resume and not has_checkpoint and info.is_main:
        print(f"no checkpoint in {out} yet: starting at step 0 (finished token shards are reused)", flush=True)
    if cfg.resume and has_checkpoint:
        try:
            model_dir, tensors, trainer_state = load_checkpoint(checkpoint)
        except CheckpointError as err:
            raise TrainError(str(err)) from None
        from transformers import AutoTokenizer

        model = EfficientLLMForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        resume_state = (tensors, trainer_state)
        plan = Plan(**trainer_state["plan"])
    else:
        model, tokenizer = load_model_and_tokenizer(cfg, out, info)
        plan = None

    try:
        pruning_cfg = PruningConfig(
            granularity=cfg.granularity,
            ema_beta=cfg.ema_beta,
            min_heads_per_layer=cfg.min_heads_per_layer,
            min_ffn_per_layer=cfg.min_ffn_per_layer,
            min_hidden_size=cfg.min_hidden_size,
            weight_update=cfg.weight_update,
            fisher=cfg.fisher,
            stem_price=cfg.stem_price,
        )
    except ValueError as err:
        raise TrainError(str(err)) from None
    world_tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * info.world_size
    if plan is None:
        source_params = count_parameters(model.config).total
        min_params = None
        if cfg.target_params is not None:
            probe = Pruner(model, pruning_cfg)
            min_params = probe.min_params()
            probe.close()  # removes its token-counting hook; the run's own Pruner installs one
        target_params = resolve_target(cfg.target_params, source_params, min_params)
        total_steps = max(1, math.ceil(cfg.tokens / world_tokens_per_step))
        prune_end = pruning_end(cfg, target_params)
        plan = Plan(
            cfg.init_config or cfg.source,
            source_params,
            target_params,
            world_tokens_per_step,
            total_steps,
            cfg.prune_start,
            prune_end,
        )
    elif plan.tokens_per_step != world_tokens_per_step:
        raise TrainError(
            f"--resume with {world_tokens_per_step} tokens per step, but the run used {plan.tokens_per_step}; "
            f"resume with the same batch size, sequence length, accumulation and number of processes"
        )

    # 2. data (rank 0 tokenizes; the others wait and read the same files). run.json is written
    # first, so that a run killed while it tokenizes continues with --resume; bad data removes it.
    data_dir = out / "data"
    marker = out / RUN_MARKER
    run_record = {"fingerprint": run_fingerprint(cfg), "config": asdict(cfg), "plan": asdict(plan)}
    created = [p for p in (out, *out.parents) if not p.exists()]
    early_marker = info.is_main and not marker.exists()
    if early_marker:
        write_json_atomic(marker, run_record)
    data_args = dict(heldout_fraction=cfg.heldout_fraction, max_tokens=cfg.max_data_tokens, text_field=cfg.text_field,
                     split=cfg.data_split, num_proc=cfg.num_proc, shard_chars=cfg.shard_chars)  # fmt: skip
    try:
        # the other ranks wait for the files, not in a collective: tokenizing can take hours, far
        # longer than a barrier's timeout (if rank 0 fails, torchrun stops them)
        main = info.is_main
        data_info = prepare_tokens(cfg.data, tokenizer, data_dir, show_progress=main and not cfg.quiet,
                                   wait=not main, **data_args)  # fmt: skip
        D.barrier(info)
    except DataError:
        if early_marker:  # bad input leaves the directory as it was
            marker.unlink(missing_ok=True)
            for path in created:
                with contextlib.suppress(OSError):
                    path.rmdir()
        raise
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite and not cfg.resume:  # only now that every input has been checked
            for stale in ("checkpoint", "model", "metrics.jsonl", "prune_log.jsonl", "evals.jsonl", "results.json"):
                p = out / stale
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        write_json_atomic(marker, run_record)

    # 3. training state
    device = info.device
    model.to(device)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")

    def autocast():
        if use_bf16:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    optimizer = build_optimizer(model, cfg)
    pruner = Pruner(model, pruning_cfg, optimizer=optimizer) if plan.target_params is not None else None
    budget = None
    if pruner is not None:
        budget = ParameterBudget(plan.source_params, plan.target_params, plan.prune_start, plan.prune_end, cfg.budget_curve)
    stream = TokenBatches(
        data_info.train_path, data_info.dtype, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
        seed=cfg.seed, rank=info.rank, world_size=info.world_size,
    )  # fmt: skip
    metrics = JsonlLog(out / "metrics.jsonl", info.is_main)
    prune_log = JsonlLog(out / "prune_log.jsonl", info.is_main)
    evals = JsonlLog(out / "evals.jsonl", info.is_main)
    step, tokens_seen = 0, 0
    run_state: dict = {"source_heldout_loss": None, "decisions_digest": None, "train_seconds": 0.0, "phase_time": {}}
    if resume_state is not None:
        tensors, trainer_state = resume_state
        optimizer.load_state_dict(tensors["optimizer"])
        if pruner is not None:
            pruner.load_state_dict(tensors["pruner"])
        stream.load_state_dict(trainer_state["data"][str(info.rank)] if "data" in trainer_state else {})
        set_rng_state(tensors["rng"])
        step, tokens_seen = trainer_state["step"], trainer_state["tokens"]
        run_state = trainer_state["run_state"]
        for log in (metrics, prune_log, evals):
            log.truncate_after(step)
    elif cfg.resume:  # killed before its first checkpoint: records of that attempt are dropped
        for log in (metrics, prune_log, evals):
            log.truncate_after(-1)

    def compile_now() -> bool:
        """--compile takes effect once the shapes stop changing: after the pruning phase (every prune
        step would recompile, and dynamo gives up compiling after a few recompilations; docs/scale.md)."""
        return cfg.compile and (pruner is None or tokens_seen >= plan.prune_end)

    net_compiled = False

    def make_net():
        nonlocal net_compiled
        net = model
        if info.enabled:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        net_compiled = compile_now()
        if net_compiled:
            net = torch.compile(net)
        return net

    net = make_net()
    eval_args = (data_info.heldout_path, data_info.dtype, cfg.seq_len, cfg.eval_windows, device, autocast)

    def save():
        # Each rank's data position is gathered so that rank 0 can write one checkpoint for all.
        positions = [stream.state_dict()]
        if info.enabled:
            positions = [None] * info.world_size
            torch.distributed.all_gather_object(positions, stream.state_dict())
        if info.is_main:
            state = {
                "step": step,
                "tokens": tokens_seen,
                "plan": asdict(plan),
                "data": {str(r): s for r, s in enumerate(positions)},
                "run_state": run_state,
            }
            save_checkpoint(out / "checkpoint", model, tokenizer, optimizer, pruner, state)
        D.barrier(info)

    if run_state["source_heldout_loss"] is None:
        run_state["source_heldout_loss"] = heldout_loss(model, *eval_args)
        evals.write([{"step": 0, "tokens": 0, "heldout_loss": run_state["source_heldout_loss"],
                      "heldout_ppl": math.exp(run_state["source_heldout_loss"]), **param_breakdown(model.config)}])  # fmt: skip
    if info.is_main:
        print(architecture_summary(model.config), flush=True)
        if plan.target_params:
            print(
                f"pruning {format_count(plan.source_params)} -> {format_count(plan.target_params)} over tokens "
                f"{plan.prune_start:,}..{plan.prune_end:,}, then continued pretraining to {plan.total_steps * plan.tokens_per_step:,}",
                flush=True,
            )

    # 4. the loop
    bar = tqdm(
        total=plan.total_steps * plan.tokens_per_step, initial=tokens_seen, unit="tok", unit_scale=True,
        disable=cfg.quiet or not info.is_main, dynamic_ncols=True, desc="train",
    )  # fmt: skip
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    exit_code = 0
    with StopRequested() as stop:
        while step < plan.total_steps:
            step_start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, plan.total_steps, cfg)
            model.train()
            step_loss = 0.0
            for micro in range(cfg.grad_accum):
                batch = stream.next_batch().to(device)
                sync = contextlib.nullcontext()
                if info.enabled and micro < cfg.grad_accum - 1:
                    sync = net.no_sync()
                with sync:
                    with autocast():
                        logits = net(batch[:, :-1], use_cache=False).logits
                    loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
                    (loss / cfg.grad_accum).backward()
                step_loss += loss.item() / cfg.grad_accum
                # Drop the graph now: its AccumulateGrad nodes remember parameter shapes, and
                # surgery below changes them (a live node would reject the next backward's grads).
                del logits, loss
            if pruner is not None and tokens_seen < plan.prune_end:
                pruner.update_saliency()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += plan.tokens_per_step
            phase = "prune" if pruner is not None and tokens_seen <= plan.prune_end else "train"

            if pruner is not None and (step % cfg.prune_every == 0 or tokens_seen >= plan.prune_end):
                limit = budget.budget(tokens_seen)
                if count_parameters(model.config).total > limit:
                    # The DDP reducer holds the parameters' grad accumulators too: release it first.
                    net = None
                    gc.collect()
                    records = pruner.prune_to(
                        limit, step=step, tokens=tokens_seen, batch=batch[:, :-1], exact=limit <= plan.target_params
                    )
                    if records:
                        prune_log.write(records)
                        if cfg.check_decisions or info.enabled:
                            run_state["decisions_digest"] = D.check_same_decisions(records, info)
                    net = make_net()
            if compile_now() and not net_compiled:
                net = None
                net = make_net()  # the pruning phase has just ended
            elapsed = time.perf_counter() - step_start
            run_state["train_seconds"] += elapsed
            pt = run_state["phase_time"].setdefault(phase, [0.0, 0])
            pt[0] += elapsed
            pt[1] += plan.tokens_per_step
            window_loss += step_loss
            window_tokens += 1
            bar.update(plan.tokens_per_step)
            if step % cfg.log_every == 0 or step == plan.total_steps:
                loss_avg = D.mean_across_ranks(window_loss / window_tokens, info)
                rate = window_tokens * plan.tokens_per_step / (time.perf_counter() - window_start)
                record = {"step": step, "tokens": tokens_seen, "loss": loss_avg, "lr": optimizer.param_groups[0]["lr"],
                          "tokens_per_s": rate, "phase": phase, **param_breakdown(model.config)}  # fmt: skip
                metrics.write([record])
                bar.set_postfix(loss=f"{loss_avg:.3f}", params=format_count(record["params"]), tok_s=f"{rate:,.0f}")
                window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
            if step % cfg.eval_every == 0 or step == plan.total_steps:
                hl = heldout_loss(model, *eval_args)
                evals.write([{"step": step, "tokens": tokens_seen, "heldout_loss": hl, "heldout_ppl": math.exp(hl),
                              **param_breakdown(model.config)}])  # fmt: skip
            if cfg.halt_at_step is not None and step == cfg.halt_at_step:
                os.kill(os.getpid(), signal.SIGTERM)
            if D.any_rank(stop.signum is not None, info):
                save()
                bar.close()
                if info.is_main:
                    print(f"\nstopped at step {step}; checkpoint saved in {out / 'checkpoint'}; continue with --resume")
                exit_code = 128 + (stop.signum or signal.SIGTERM)
                break
            if step % cfg.save_every == 0 and step < plan.total_steps:
                save()
    bar.close()
    if exit_code:
        return {"exit_code": exit_code}

    # 5. the result
    save()
    weights_digest = D.check_same_weights(model, info) if (cfg.check_decisions or info.enabled) else None
    result = {}
    if info.is_main:
        final_loss = heldout_loss(model, *eval_args)
        unigram = unigram_perplexity(
            data_info.train_path, data_info.heldout_path, data_info.dtype, data_info.vocab_size
        )
        model_dir = out / "model"
        with staged_dir(model_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        phase_speed = {k: v[1] / v[0] for k, v in run_state["phase_time"].items() if v[0] > 0}
        result = {
            "source": plan.source,
            "source_params": plan.source_params,
            "target_params": plan.target_params,
            "final_params": count_parameters(model.config).total,
            "parameters": count_parameters(model.config).as_dict(),
            "layer_shapes": model.config.layer_shapes(),
            "hidden_size": model.config.hidden_size,
            "tokens": tokens_seen,
            "steps": step,
            "source_heldout_ppl": math.exp(run_state["source_heldout_loss"]),
            "final_heldout_ppl": math.exp(final_loss),
            "unigram_heldout_ppl": unigram,
            "tokens_per_s_by_phase": phase_speed,
            "train_seconds": run_state["train_seconds"],
            "world_size": info.world_size,
            "decisions_digest": run_state["decisions_digest"],
            "weights_digest": weights_digest,
            "model_dir": str(model_dir),
        }
        write_json_atomic(out / "results.json", result)
        from .report import write_report

        write_report(out, result, metrics.read(), evals.read(), prune_log.read(), model.config)
        print("\n" + architecture_summary(model.config))
        print(
            f"held-out perplexity: source {result['source_heldout_ppl']:.2f}, result {result['final_heldout_ppl']:.2f}, "
            f"unigram baseline {unigram:.2f}"
        )
        print(f"model: {model_dir}   report: {out / 'summary.md'}")
    D.barrier(info)
    return result
