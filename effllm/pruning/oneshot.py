"""One-shot pruning: the LLM-Pruner-style baseline the method benchmark compares against, and the
calibration pass that effllm-train's one-shot and staged schedules run before each removal.

The same saliency as during pruning-aware pretraining (docs/method.md), but from K calibration
batches at the current weights, averaged with equal weight (no EMA decay), and the model pruned
to the target in one selection. Recovery training afterwards is the caller's business.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .config import PruningConfig
from .pruner import Pruner, zero_grads


def _ids(batch, device) -> torch.Tensor:
    ids = batch["input_ids"] if isinstance(batch, dict) else batch
    return torch.as_tensor(ids).to(device)


def calibrate(pruner: Pruner, batches: Iterable, loss: Callable | None = None) -> torch.Tensor:
    """Reset ``pruner``'s saliency to a plain mean and accumulate it over ``batches``: one forward,
    backward and saliency update each, gradients cleared after every one (and before the first).
    Returns the last batch (on the model's device; OBS takes its input Hessians from it).

    ``loss(ids)`` gives the scalar to differentiate (a trainer passes its own objective, through
    its DDP wrapper so that every rank folds in the same all-reduced gradients); by default the
    model's own next-token loss with the batch as input and label.
    """
    model = pruner.model
    device = model.model.embed_tokens.weight.device
    if loss is None:
        loss = lambda ids: model(input_ids=ids, labels=ids, use_cache=False).loss  # noqa: E731
    pruner.reset_saliency("mean")
    zero_grads(model)
    last = None
    for batch in batches:
        last = _ids(batch, device)
        with torch.enable_grad():
            loss(last).backward()
        pruner.update_saliency()
        zero_grads(model)
    if pruner.steps == 0:
        raise ValueError("calibration needs at least one batch")
    return last


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
    model.eval()
    try:
        last = calibrate(pruner, batches)
    except ValueError:
        raise ValueError("one_shot_prune needs at least one calibration batch") from None
    records = pruner.prune_to(int(target_params), step=0, tokens=0, batch=last, exact=True)
    pruner.close()
    model.eval()
    zero_grads(model)
    return records


__all__ = ["calibrate", "one_shot_prune"]
