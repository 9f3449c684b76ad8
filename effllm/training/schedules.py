"""When a run removes groups (--schedule): continuously along the budget, once, or in K stages.

* continuous (the paper, the default): after every --prune-every steps of the pruning phase the
  least salient groups go until the model fits the budget P(t); the saliency moving averages
  are updated from every training step's gradients (``prune_step``).
* one-shot: at --prune-start a calibration pass (--calibration-batches micro-batches: forward and
  backward of the training objective, no optimizer step) accumulates the same saliency as a plain
  mean, then one removal lands on the target; every later token trains the final architecture.
* staged: --stages such removals, spread evenly over the pruning phase, each to the budget of its
  stage's end (``ParameterBudget.stages``); recovery training follows each (``before_step``).

A calibration pass and its removal happen between two optimizer steps, where no checkpoint is
written: a kill during it resumes from the checkpoint before it and repeats it exactly (its
batches come from a stream of their own, seeded by the run's seed and the stage, so the training
batches are those of any other schedule); ``stages_done`` in the checkpoint's ledger says which
removals the model already had. So every schedule resumes bitwise.
"""

from __future__ import annotations

import gc
import time

from effllm.model.params import count_parameters, format_count
from effllm.training import distributed as D
from effllm.training.distill import training_loss
from effllm.training.plan import TrainError
from effllm.training.recipe import TrainConfig

SCHEDULES = ("continuous", "one-shot", "staged")
CALIBRATION_SEED = 7919  # calibration streams are seeded apart from the training stream's seed


def check_config(cfg: TrainConfig) -> None:
    """The schedule flags, before anything is loaded or written."""
    if cfg.schedule not in SCHEDULES:
        raise TrainError(f"--schedule {cfg.schedule!r} is not one of {', '.join(SCHEDULES)}")
    if cfg.schedule == "continuous":
        return
    if cfg.target_params is None:
        raise TrainError(f"--schedule {cfg.schedule} prunes to --target-params; give one (e.g. 0.4 or 150M)")
    if cfg.calibration_batches < 1:
        raise TrainError(f"--calibration-batches must be at least 1 (got {cfg.calibration_batches})")
    if cfg.stages < 1:
        raise TrainError(f"--stages must be at least 1 (got {cfg.stages}); 1 stage is --schedule one-shot")
    if cfg.prune_start >= cfg.tokens:
        raise TrainError(
            f"--prune-start {cfg.prune_start:,} leaves no training after the removal (the run has {cfg.tokens:,} "
            "tokens); lower --prune-start or raise --tokens"
        )


def stage_count(cfg: TrainConfig) -> int:
    return {"one-shot": 1, "staged": cfg.stages}.get(cfg.schedule, 0)


def removals(cfg: TrainConfig, budget) -> list[tuple[int, int]]:
    """(tokens, budget) of each one-time removal; empty for the continuous schedule."""
    return budget.stages(stage_count(cfg)) if stage_count(cfg) else []


def describe(cfg: TrainConfig, budget) -> str:
    """The schedule in one line, for --dry-run."""
    if cfg.schedule == "continuous":
        return f"schedule: continuous (a prune step every {cfg.prune_every} step(s) of the pruning phase)"
    where = ", ".join(f"{format_count(p)} at {t:,} tokens" for t, p in removals(cfg, budget))
    return (
        f"schedule: {cfg.schedule}, {stage_count(cfg)} removal(s), each after a calibration pass of "
        f"{cfg.calibration_batches} micro-batches (not trained on): {where}"
    )


def tracks_saliency(state) -> bool:
    """Whether this step's gradients feed the saliency (continuous schedule, pruning phase only)."""
    return state.pruner is not None and state.cfg.schedule == "continuous" and state.tokens_seen < state.plan.prune_end


def phase(state) -> str:
    """The metrics' phase label of the step just done."""
    pruning = state.pruner is not None and state.tokens_seen <= state.plan.prune_end
    return "prune" if pruning and state.cfg.schedule == "continuous" else "train"


def remove_to(state, limit: int, batch, exact: bool, **extra) -> list[dict]:
    """Remove the least salient groups until the model fits ``limit``; log the decisions (with
    ``extra`` fields), check them across ranks, and rewrap the model."""
    # The DDP reducer holds the parameters' grad accumulators too: release it first.
    state.net = None
    gc.collect()
    records = state.pruner.prune_to(limit, step=state.step, tokens=state.tokens_seen, batch=batch, exact=exact)
    for record in records:
        record.update(extra)
    if records:
        state.prune_log.write(records)
        if state.cfg.check_decisions or state.info.enabled:
            state.ledger["decisions_digest"] = D.check_same_decisions(records, state.info)
    state.make_net()
    return records


def prune_step(state, batch) -> None:
    """Continuous: every --prune-every steps of the pruning phase (and at its end), down to the budget."""
    cfg, plan = state.cfg, state.plan
    if state.pruner is None or cfg.schedule != "continuous":
        return
    if not (state.step % cfg.prune_every == 0 or state.tokens_seen >= plan.prune_end):
        return
    limit = state.budget.budget(state.tokens_seen)
    if count_parameters(state.model.config).total <= limit:
        return
    remove_to(state, limit, batch[:, :-1], exact=limit <= plan.target_params)


def calibration_batches(state, stage: int):
    """This rank's calibration micro-batches for ``stage`` (a fresh stream: nothing to checkpoint)."""
    from effllm.data.token_batches import TokenBatches

    cfg, info, data = state.cfg, state.info, state.data
    stream = TokenBatches(
        data.train_path, data.dtype, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
        seed=(cfg.seed + CALIBRATION_SEED * (stage + 1)), rank=info.rank, world_size=info.world_size,
    )  # fmt: skip
    return (stream.next_batch() for _ in range(cfg.calibration_batches))


def before_step(state) -> None:
    """One-shot and staged: every removal now due (its token count reached, not yet done): a
    calibration pass through the run's objective and wrapper (DDP all-reduces its gradients, so
    every rank folds in the same saliency), then the removal."""
    from effllm.pruning import calibrate

    if state.pruner is None or state.cfg.schedule == "continuous":
        return
    plan, ledger = state.plan, state.ledger
    stages = removals(state.cfg, state.budget)
    done = ledger.setdefault("stages_done", 0)
    while done < len(stages) and state.tokens_seen >= stages[done][0]:
        start = time.perf_counter()
        state.model.train()
        # the model's own next-token loss even with --distill: the KD gradient is zero while the student
        # still equals its teacher, so it cannot rank groups (and the pass is not trained on)
        loss = lambda ids: training_loss(state.net, ids, state.autocast)  # noqa: E731
        last = calibrate(state.pruner, calibration_batches(state, done), loss)
        limit = stages[done][1]
        records = remove_to(state, limit, last[:, :-1], exact=limit <= plan.target_params, stage=done + 1)
        done = ledger["stages_done"] = done + 1
        elapsed = time.perf_counter() - start
        ledger["train_seconds"] += elapsed
        pt = ledger["phase_time"].setdefault("calibrate", [0.0, 0])
        pt[0] += elapsed
        pt[1] += state.cfg.calibration_batches * state.stream.tokens_per_batch * state.info.world_size
        if state.info.is_main and not state.cfg.quiet:
            print(f"\nstage {done}/{len(stages)} at {state.tokens_seen:,} tokens: calibrated on "
                  f"{state.cfg.calibration_batches} micro-batches, removed {len(records)} groups, now "
                  f"{format_count(count_parameters(state.model.config).total)} parameters", flush=True)  # fmt: skip


__all__ = ["SCHEDULES", "before_step", "check_config", "describe", "prune_step", "removals", "tracks_saliency"]
