"""Physical removal of groups: weights, gradients, optimizer state and config, in one pass.

Every parameter is sliced at most once (a tied embedding/lm_head is one Parameter, sliced once)
and in place, ``p.data = p.data[keep]``, so Parameter identity survives: the optimizer's
param_groups, the tie between embedding and lm_head, and any outside reference stay valid. The
gradient and every optimizer state tensor with the parameter's shape (AdamW's exp_avg and
exp_avg_sq, SGD's momentum_buffer, ...) are sliced along the same dims; scalar state (``step``)
is kept. A state tensor of any other shape (a factored optimizer) cannot be sliced faithfully:
that parameter's state is dropped with a warning and the optimizer re-initializes it lazily.

What each group owns, and what goes with a block's last unit, is ``ownership``'s table. A layer
that loses all its attention groups loses ``self_attn`` and ``input_layernorm`` (set to None);
one that loses all FFN channels loses ``mlp`` and ``post_attention_layernorm``. Their
parameters leave the optimizer's param_groups and state. The config's per-layer shapes and
hidden size, and the nn.Linear / nn.Embedding size attributes, are updated to match.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .groups import GroupType
from .ownership import ATTENTION, BLOCKS, FFN, STEM, block_parts, expand_rows, outer_parts, units

log = logging.getLogger(__name__)


@dataclass
class Removal:
    """Units to remove, by position in the current model: KV heads and FFN channels per layer, stem channels."""

    attention: dict[int, list[int]] = field(default_factory=dict)
    ffn: dict[int, list[int]] = field(default_factory=dict)
    stem: list[int] = field(default_factory=list)

    def add(self, kind: GroupType, layer: int | None, positions) -> None:
        positions = [int(p) for p in positions]
        if kind == GroupType.ATTENTION:
            self.attention.setdefault(layer, []).extend(positions)
        elif kind == GroupType.FFN:
            self.ffn.setdefault(layer, []).extend(positions)
        else:
            self.stem.extend(positions)


@dataclass
class Kept:
    """Surviving positions (ascending LongTensors) for everything that changed; None: unchanged."""

    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    ffn: dict[int, torch.Tensor] = field(default_factory=dict)
    stem: torch.Tensor | None = None


def keep_index(n: int, removed) -> torch.Tensor | None:
    """Ascending positions in range(n) that are not in ``removed``; None when nothing is removed."""
    removed = {int(r) for r in removed}
    if not removed:
        return None
    bad = [r for r in removed if not 0 <= r < n]
    if bad:
        raise IndexError(f"positions {sorted(bad)} are out of range for width {n}")
    mask = torch.ones(n, dtype=torch.bool)
    mask[list(removed)] = False
    return mask.nonzero().flatten()


def _cut(t: torch.Tensor, slices: dict[int, torch.Tensor]) -> torch.Tensor:
    for dim, idx in slices.items():
        t = t.index_select(dim, idx.to(t.device))
    return t


def slice_parameter(p: nn.Parameter, slices: dict[int, torch.Tensor], optimizer=None) -> None:
    """Keep ``slices[dim]`` along each dim of p, its gradient and its optimizer state, in place."""
    old_shape = p.shape
    with torch.no_grad():
        p.data = _cut(p.data, slices)
        if p.grad is not None:
            p.grad = _cut(p.grad, slices)
    if optimizer is None or p not in optimizer.state:
        return
    state = optimizer.state[p]
    unsliceable = []
    for key, value in list(state.items()):
        if not torch.is_tensor(value) or value.dim() == 0:
            continue
        if value.shape == old_shape:
            state[key] = _cut(value, slices)
        else:
            unsliceable.append(key)
    if unsliceable:
        log.warning(
            "optimizer state %s of a %s parameter does not have its shape; dropped (re-initialized at the next step)",
            unsliceable,
            tuple(old_shape),
        )
        del optimizer.state[p]


def drop_parameters(optimizer, params) -> None:
    """Remove parameters from an optimizer's param_groups and state (empty groups stay, for LR schedulers)."""
    if optimizer is None:
        return
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    for p in params:
        optimizer.state.pop(p, None)


def apply_surgery(model, removal: Removal, optimizer=None) -> Kept:
    """Physically remove ``removal`` from ``model`` (and ``optimizer``); returns the surviving positions."""
    inner, config = model.model, model.config
    d = inner.embed_tokens.weight.shape[1]
    kept = Kept()
    stem_keep = keep_index(d, removal.stem)
    if stem_keep is not None and stem_keep.numel() == 0:
        raise ValueError("cannot remove every hidden channel: the model would have no residual stream")
    kept.stem = stem_keep

    plan: dict[int, tuple[nn.Parameter, dict[int, torch.Tensor]]] = {}  # by id: a tied weight is sliced once
    keeps = {STEM: stem_keep}

    def add(parts) -> None:
        for part in parts:
            for axis in part.axes:
                idx = expand_rows(keeps[axis.owner], axis.width)
                if idx is not None:
                    plan.setdefault(id(part.param), (part.param, {}))[1][axis.dim] = idx

    dropped: list[nn.Parameter] = []
    add(outer_parts(model))
    new_shapes = []
    for i, layer in enumerate(inner.layers):
        n = units(layer)
        g = layer.self_attn.num_heads // n[ATTENTION] if n[ATTENTION] else 0  # query heads per KV head
        for kind, removed, kept_units in ((ATTENTION, removal.attention, kept.attention), (FFN, removal.ffn, kept.ffn)):
            keeps[kind] = idx = keep_index(n[kind], removed.get(i, ())) if n[kind] else None
            if idx is not None:
                kept_units[i] = idx
                n[kind] = idx.numel()
            if idx is not None and n[kind] == 0:  # the block's last unit: its modules go, norm and biases too
                for attr in BLOCKS[kind]:
                    dropped += list(getattr(layer, attr).parameters())
                    setattr(layer, attr, None)
            else:
                add(block_parts(layer, i, kind))
        new_shapes.append((g * n[ATTENTION], n[ATTENTION], n[FFN]))

    for p, slices in plan.values():
        slice_parameter(p, slices, optimizer)
    drop_parameters(optimizer, dropped)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.Embedding):
            module.embedding_dim = module.weight.shape[1]
    if stem_keep is not None:
        config.hidden_size = int(stem_keep.numel())
    config.set_layer_shapes(new_shapes)
    return kept


__all__ = ["Kept", "Removal", "apply_surgery", "drop_parameters", "keep_index", "slice_parameter"]
