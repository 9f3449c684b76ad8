"""Local second-order weight update when groups are removed (docs/method.md "OBS", as in SparseGPT).

For a consumer weight W (out x in) whose input columns P are removed, with the Hessian of that
layer's inputs X on the current batch, H = 2 X^T X + lambda*I (lambda = damping * mean diag):

    W[:, rest] <- W[:, rest] - W[:, P] (Hinv[P,P])^-1 Hinv[P, rest]            (Hinv = H^-1)

Consumers: FFN channels -> down_proj; attention groups -> o_proj; stem channels -> the input
columns of q/k/v (one shared input), gate/up (one shared input) in every layer, and of an untied
lm_head (a tied lm_head is the embedding: updating it would change the inputs, so it is left
alone). A block removed entirely has nothing left to compensate with.

X^T X is accumulated by forward pre-hooks on the affected modules only, during one forward on
the batch, and never kept beyond the call; under torch.distributed it is all-reduced (sum) so
every rank applies the same update. The update runs before surgery, on the full weights; the
surgery then drops the columns P.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from .ownership import ATTENTION, FFN, STEM, block_parts, expand_rows, outer_parts, units
from .surgery import Removal

log = logging.getLogger(__name__)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def compensate(weight: torch.Tensor, removed: torch.Tensor, xtx: torch.Tensor, damping: float = 0.01) -> bool:
    """Apply the OBS update for removing input columns ``removed`` of ``weight`` (in place). False if skipped."""
    n = weight.shape[1]
    removed = removed.to(weight.device)
    mask = torch.ones(n, dtype=torch.bool, device=weight.device)
    mask[removed] = False
    rest = mask.nonzero().flatten()
    if rest.numel() == 0 or removed.numel() == 0:
        return False
    dtype = torch.float64 if weight.device.type == "cpu" else torch.float32
    h = 2.0 * xtx.to(device=weight.device, dtype=dtype)
    mean_diag = h.diagonal().mean()
    if not torch.isfinite(mean_diag) or mean_diag <= 0:
        log.warning("OBS: the inputs of a %s weight are all zero on this batch; plain removal", tuple(weight.shape))
        return False
    lam = damping * mean_diag
    for attempt in range(4):
        try:
            chol = torch.linalg.cholesky(h + lam * (10**attempt) * torch.eye(n, dtype=dtype, device=h.device))
            break
        except RuntimeError:
            continue
    else:
        log.warning(
            "OBS: the input Hessian of a %s weight is not positive definite; plain removal", tuple(weight.shape)
        )
        return False
    hinv = torch.cholesky_inverse(chol)
    h_pp = hinv[removed][:, removed]
    h_pr = hinv[removed][:, rest]
    w = weight.to(dtype)
    delta = w[:, removed] @ torch.linalg.solve(h_pp, h_pr)
    weight[:, rest] = (w[:, rest] - delta).to(weight.dtype)
    return True


def obs_update(model, removal: Removal, batch: torch.Tensor, damping: float = 0.01) -> list[str]:
    """Compensate every consumer of ``removal`` using the inputs seen on ``batch``; returns the updated weights' names."""
    inner = model.model
    # hooked module -> list of (name, consumer weight, removed input columns)
    consumers: dict[torch.nn.Module, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
    removed = {STEM: sorted(set(removal.stem))}

    def add(parts) -> None:
        for part in parts:
            if part.reads is None:
                continue
            cols = next(axis for axis in part.axes if axis.dim == 1)  # its inputs: whose removal takes them away
            if removed[cols.owner]:
                idx = expand_rows(torch.tensor(removed[cols.owner], dtype=torch.long), cols.width)
                consumers.setdefault(part.reads, []).append((part.name.removesuffix(".weight"), part.param, idx))

    for i, layer in enumerate(inner.layers):
        n = units(layer)
        for kind, by_layer in ((ATTENTION, removal.attention), (FFN, removal.ffn)):
            removed[kind] = sorted(set(by_layer.get(i, ())))
            if len(removed[kind]) < n[kind]:  # a block removed entirely has nothing left to compensate with
                add(block_parts(layer, i, kind))
    add(outer_parts(model))
    if not consumers:
        return []

    xtx: dict[torch.nn.Module, torch.Tensor] = {}

    def hook(module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        if module not in xtx:
            xtx[module] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        xtx[module].addmm_(x.T, x)

    handles = [m.register_forward_pre_hook(hook) for m in consumers]
    was_training = model.training
    try:
        model.eval()
        device = inner.embed_tokens.weight.device
        with torch.no_grad():
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if _distributed():
        for module in consumers:  # same order on every rank: module order follows the model
            dist.all_reduce(xtx[module], op=dist.ReduceOp.SUM)
    updated = []
    for module, items in consumers.items():
        for name, weight, cols in items:
            if compensate(weight.data, cols, xtx[module], damping):
                updated.append(name)
    return updated


__all__ = ["compensate", "obs_update"]
