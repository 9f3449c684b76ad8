"""A run's live state, built fresh or from its checkpoint, and saved back to one.

``load_start`` gives the starting model and tokenizer (the source, a random init from
--init-config, or the checkpoint's pruned model with its saved plan); ``build_state`` puts it on
the device with its optimizer, pruner, budget, data stream and logs, and on --resume loads their
saved states and the RNG states, so that a resumed run is bitwise equal to an uninterrupted one
(on CPU). ``RunState.save`` writes the checkpoint; ``RunState.make_net`` wraps the model for the
loop (DDP under torchrun, torch.compile once the shapes stop changing).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from effllm.common.errors import first_line
from effllm.model.configuration_effllm import EfficientLLMConfig
from effllm.model.convert import UnsupportedSourceError, from_pretrained
from effllm.model.file_checks import BadModelFileError
from effllm.model.model_dir import check_model_files, load_tokenizer
from effllm.model.modeling_effllm import EfficientLLMForCausalLM
from effllm.training import distributed as D
from effllm.training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from effllm.training.plan import Plan, TrainError
from effllm.training.recipe import TrainConfig
from effllm.training.run_files import JsonlLog


# ---- the starting point -------------------------------------------------------------------------
def load_model_and_tokenizer(cfg: TrainConfig, out: Path, info: D.DistInfo):
    """The starting model (source import, or random init from --init-config) and its tokenizer."""
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
            tokenizer = load_tokenizer(tok_source)
        except BadModelFileError:
            raise TrainError(f"--init-config {cfg.init_config}: put the tokenizer files next to config.json") from None
        return model, tokenizer
    try:
        model, tokenizer = from_pretrained(cfg.source, dtype=torch.float32)
    except UnsupportedSourceError as err:
        raise TrainError(str(err)) from None
    if tokenizer is None:
        raise TrainError(f"source {cfg.source} has no tokenizer; add tokenizer files to it")
    return model, tokenizer


@dataclass
class Start:
    """Where a run starts: a model and tokenizer, and on --resume from a checkpoint its saved plan
    and ``resume`` = (the checkpoint's state, trainer.json)."""

    model: EfficientLLMForCausalLM
    tokenizer: object
    saved_plan: Plan | None = None
    resume: tuple[dict, dict] | None = None


def load_start(cfg: TrainConfig, out: Path, info: D.DistInfo) -> Start:
    """The checkpoint's model on --resume (when there is one), else the source (or --init-config)."""
    checkpoint = latest_checkpoint(out)
    has_checkpoint = checkpoint is not None
    if cfg.resume and not has_checkpoint and info.is_main:
        print(f"no checkpoint in {out} yet: starting at step 0 (finished token shards are reused)", flush=True)
    if cfg.resume and has_checkpoint:
        try:
            model_dir, tensors, trainer_state = load_checkpoint(checkpoint)
        except CheckpointError as err:
            raise TrainError(str(err)) from None
        try:
            check_model_files(model_dir)
        except BadModelFileError as err:
            raise TrainError(f"{err} (in the checkpoint: restart the run with --overwrite)") from None
        model = EfficientLLMForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tokenizer = load_tokenizer(model_dir)
        return Start(model, tokenizer, Plan(**trainer_state["plan"]), (tensors, trainer_state))
    model, tokenizer = load_model_and_tokenizer(cfg, out, info)
    return Start(model, tokenizer)


# ---- the optimizer ------------------------------------------------------------------------------
def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with decay on matrices only; groups in named_parameters order, so a resumed model
    (built from the checkpoint's pruned config) lines up with the saved optimizer state."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


# ---- the run's state ----------------------------------------------------------------------------
def new_ledger() -> dict:
    """The run's bookkeeping across restarts (saved as trainer.json's "run_state")."""
    return {"source_heldout_loss": None, "decisions_digest": None, "train_seconds": 0.0, "phase_time": {}}


@dataclass
class RunState:
    """Everything the loop reads and changes; ``step``, ``tokens_seen`` and ``ledger`` are saved
    with the model, optimizer, pruner, data positions and RNG states in the checkpoint."""

    cfg: TrainConfig
    info: D.DistInfo
    out: Path
    plan: Plan
    data: object  # effllm.data.prepare.TokenData: train/held-out token files
    model: EfficientLLMForCausalLM
    tokenizer: object
    optimizer: torch.optim.AdamW
    pruner: object | None  # effllm.pruning.Pruner; None without a target
    budget: object | None  # effllm.pruning.ParameterBudget; None without a target
    stream: object  # effllm.data.token_batches.TokenBatches, this rank's share of the batches
    metrics: JsonlLog
    prune_log: JsonlLog
    evals: JsonlLog
    use_bf16: bool
    step: int = 0
    tokens_seen: int = 0
    ledger: dict = field(default_factory=new_ledger)
    net: torch.nn.Module | None = None  # the model as the loop calls it (DDP, compiled)
    net_compiled: bool = False
    distill: object | None = None  # effllm.training.distill.Distiller under --distill: the frozen teacher

    @property
    def device(self) -> torch.device:
        return self.info.device

    def autocast(self):
        if self.use_bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def eval_args(self) -> tuple:
        """heldout_loss's arguments after the model."""
        d = self.data
        return (d.heldout_path, d.dtype, self.cfg.seq_len, self.cfg.eval_windows, self.device, self.autocast)

    def compile_now(self) -> bool:
        """--compile takes effect once the shapes stop changing: after the pruning phase (every prune
        step would recompile, and dynamo gives up compiling after a few recompilations; docs/scale.md)."""
        return self.cfg.compile and (self.pruner is None or self.tokens_seen >= self.plan.prune_end)

    def make_net(self) -> None:
        """(Re)wraps the model: after surgery, and when the pruning phase ends under --compile. The
        previous wrapper must be released first (``net = None``): DDP's reducer holds the grads."""
        net = self.model
        if self.info.enabled:
            device = self.device
            net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.net_compiled = self.compile_now()
        if self.net_compiled:
            net = torch.compile(net)
        self.net = net

    def save(self) -> None:
        """The checkpoint, written by rank 0 with every rank's data position (gathered)."""
        positions = [self.stream.state_dict()]
        if self.info.enabled:
            positions = [None] * self.info.world_size
            torch.distributed.all_gather_object(positions, self.stream.state_dict())
        if self.info.is_main:
            state = {
                "step": self.step,
                "tokens": self.tokens_seen,
                "plan": asdict(self.plan),
                "data": {str(r): s for r, s in enumerate(positions)},
                "run_state": self.ledger,
            }
            save_checkpoint(self.out / "checkpoint", self.model, self.tokenizer, self.optimizer, self.pruner, state)
        D.barrier(self.info)


def build_state(cfg: TrainConfig, info: D.DistInfo, out: Path, start: Start, plan: Plan, pruning_cfg, data) -> RunState:
    """The model on its device with optimizer, pruner, budget, stream and logs; on --resume their
    saved states, the RNG states and the logs cut back to the checkpoint's step; then the net."""
    from effllm.data.token_batches import TokenBatches
    from effllm.pruning import ParameterBudget, Pruner

    model, device = start.model, info.device
    model.to(device)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    optimizer = build_optimizer(model, cfg)
    pruner = Pruner(model, pruning_cfg, optimizer=optimizer) if plan.target_params is not None else None
    budget = None
    if pruner is not None:
        budget = ParameterBudget(
            plan.source_params, plan.target_params, plan.prune_start, plan.prune_end, cfg.budget_curve
        )
    stream = TokenBatches(
        data.train_path, data.dtype, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
        seed=cfg.seed, rank=info.rank, world_size=info.world_size,
    )  # fmt: skip
    state = RunState(
        cfg, info, out, plan, data, model, start.tokenizer, optimizer, pruner, budget, stream,
        metrics=JsonlLog(out / "metrics.jsonl", info.is_main),
        prune_log=JsonlLog(out / "prune_log.jsonl", info.is_main),
        evals=JsonlLog(out / "evals.jsonl", info.is_main),
        use_bf16=use_bf16,
    )  # fmt: skip
    logs = (state.metrics, state.prune_log, state.evals)
    if start.resume is not None:
        tensors, trainer_state = start.resume
        try:  # a state that parses but does not fit this model is as unusable as an unreadable one
            optimizer.load_state_dict(tensors["optimizer"])
            if pruner is not None:
                pruner.load_state_dict(tensors["pruner"])
            stream.load_state_dict(trainer_state["data"][str(info.rank)] if "data" in trainer_state else {})
            set_rng_state(tensors["rng"])
            state.step, state.tokens_seen = trainer_state["step"], trainer_state["tokens"]
            state.ledger = trainer_state["run_state"]
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
            raise TrainError(
                f"checkpoint in {out} does not fit its model ({type(err).__name__}: {first_line(err)}); "
                "delete it and restart with --overwrite"
            ) from None
        for log in logs:
            log.truncate_after(state.step)
    elif cfg.resume:  # killed before its first checkpoint: records of that attempt are dropped
        for log in logs:
            log.truncate_after(-1)
    state.make_net()
    return state
