"""torch.distributed set-up for torchrun (DDP): NCCL on GPUs, gloo on CPU; a no-op for one process."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Reads torchrun's environment; picks the device (cuda:LOCAL_RANK when CUDA is available)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when any rank says True (a signal received by one rank stops all of them)."""
    if not info.enabled:
        return flag
    t = torch.tensor([int(flag)], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_across_ranks(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.item() / info.world_size


def decisions_hash(records: list[dict]) -> str:
    """A digest of pruning decisions (what was removed, in which order); saliency floats excluded."""
    keys = ("step", "type", "layer", "index", "size", "params_after")
    text = json.dumps([[r.get(k) for k in keys] for r in records])
    return hashlib.sha256(text.encode()).hexdigest()


class DecisionMismatchError(RuntimeError):
    pass


def check_same_decisions(records: list[dict], info: DistInfo) -> str:
    """Gathers every rank's decision digest; raises if any rank pruned differently. Returns the digest."""
    digest = decisions_hash(records)
    if info.enabled:
        gathered: list[str | None] = [None] * info.world_size
        dist.all_gather_object(gathered, digest)
        if len(set(gathered)) != 1:
            raise DecisionMismatchError(f"ranks made different pruning decisions: {gathered}")
    return digest


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_same_weights(model: torch.nn.Module, info: DistInfo) -> str:
    """Raises if the ranks' weights are not bitwise identical (DDP must keep them so)."""
    digest = weights_digest(model)
    if info.enabled:
        gathered: list[str | None] = [None] * info.world_size
        dist.all_gather_object(gathered, digest)
        if len(set(gathered)) != 1:
            raise DecisionMismatchError(f"ranks ended with different weights: {gathered}")
    return digest


def shutdown_if_initialized() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
