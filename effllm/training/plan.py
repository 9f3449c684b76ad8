"""A training run's plan: its inputs checked, and the numbers fixed at its start (kept in run.json).

``plan_run`` resolves --target-params against the source, sizes a step across all processes and
places the pruning phase; a resumed run keeps the plan it started with. Everything here raises
TrainError before anything is written. (effllm.training.dry_run is the --dry-run preview; it uses
``resolve_target`` and ``pruning_end`` from here.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from effllm.common.errors import EffllmError
from effllm.model.params import count_parameters, format_count, parse_count
from effllm.training.recipe import TrainConfig


class TrainError(EffllmError):
    """Bad input for a training run: one line naming the problem and the fix (the CLI exits 2)."""


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


def pruning_config(cfg: TrainConfig):
    """The run's PruningConfig; its own checks become TrainErrors."""
    from dataclasses import fields

    from effllm.pruning import PruningConfig

    # every pruning knob the training config has, by name: a new knob needs no copying code here
    knobs = {f.name: getattr(cfg, f.name) for f in fields(PruningConfig) if hasattr(cfg, f.name)}
    try:
        return PruningConfig(**knobs)
    except ValueError as err:
        raise TrainError(str(err)) from None


def plan_run(cfg: TrainConfig, model, saved: Plan | None, pruning_cfg, world_size: int) -> Plan:
    """A new run's plan for ``model`` (the source); or ``saved``, the resumed run's own, checked
    against this invocation's tokens per step."""
    from effllm.pruning import Pruner

    world_tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world_size
    if saved is not None:
        if saved.tokens_per_step != world_tokens_per_step:
            raise TrainError(
                f"--resume with {world_tokens_per_step} tokens per step, but the run used {saved.tokens_per_step}; "
                f"resume with the same batch size, sequence length, accumulation and number of processes"
            )
        return saved
    if pruning_cfg.shape == "uniform":
        from effllm.pruning import ModelShapes, check_uniform

        try:
            check_uniform(ModelShapes.from_config(model.config))
        except ValueError as err:
            raise TrainError(f"--shape uniform: {err}") from None
    source_params = count_parameters(model.config).total
    min_params = None
    if cfg.target_params is not None:
        probe = Pruner(model, pruning_cfg)
        min_params = probe.min_params()
        probe.close()  # removes its token-counting hook; the run's own Pruner installs one
    target_params = resolve_target(cfg.target_params, source_params, min_params)
    total_steps = max(1, math.ceil(cfg.tokens / world_tokens_per_step))
    prune_end = pruning_end(cfg, target_params)
    return Plan(
        cfg.init_config or cfg.source,
        source_params,
        target_params,
        world_tokens_per_step,
        total_steps,
        cfg.prune_start,
        prune_end,
    )
