"""One-shot pruning: the LLM-Pruner-style baseline the method benchmark compares against.

The same saliency as during pruning-aware pretraining (docs/method.md), but from K calibration
batches at the final weights, averaged with equal weight (no EMA decay), and the model pruned
to the target in one selection. Recovery training afterwards is the caller's business.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .config import PruningConfig
from .pruner import Pruner, zero_grads


def one_shot_prune(model, batches: Iterable, target_params: int, cfg: PruningConfig | None = None) -> list[dict]:
    """Accumulate saliency over ``batches`` (LongTensor [B, T+1] or [B, T] token ids, or dicts with
    ``input_ids``), then prune ``model`` to ``target_params`` at once. Returns the prune records;
    leaves the model in eval mode without gradients.

    Each batch is fed as input and label (the loss shifts by one inside the model), so a [B, T+1]
    batch trains T predictions, exactly as an (inputs, labels) = (b[:, :-1], b[:, 1:]) split would.
    With weight_update="obs" the last batch provides the input Hessians.
    """
    cfg = cfg or PruningConfig()
    pruner = Pruner(model, cfg, optimizer=None, mode="mean")
    device = model.model.embed_tokens.weight.device
    model.eval()
    zero_grads(model)
    last, tokens = None, 0
    for batch in batches:
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        ids = torch.as_tensor(ids).to(device)
        with torch.enable_grad():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        pruner.update_saliency()
        zero_grads(model)
        last, tokens = ids, tokens + ids.numel()
    if pruner.steps == 0:
        raise ValueError("one_shot_prune needs at least one calibration batch")
    records = pruner.prune_to(int(target_params), step=0, tokens=0, batch=last, exact=True)
    pruner.close()
    model.eval()
    zero_grads(model)
    return records


__all__ = ["one_shot_prune"]
