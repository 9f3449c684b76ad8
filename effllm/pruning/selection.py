"""Which groups go: the globally lowest saliency density, across types and layers (docs/method.md).

Groups of different types remove very different numbers of parameters, so they are compared by
density = saliency / parameters removed. Greedy, one group at a time, until the parameter count
is within the budget: every pick changes the shapes, hence the sizes (a stem channel shrinks
every other group, each FFN channel shrinks the stem group), so the densities are re-priced
after each pick. Within a (type, layer) all groups cost the same, so the candidate is the least
salient one; with granularity N it is the N least salient channels (the remainder first, so a
width becomes a multiple of N), scored by the sum of their saliencies.

Deterministic: stable sorts, float64 scores, ties broken by (type, layer, position); given the
same (all-reduced) saliency, every rank selects the same groups. Floors and guards are documented
in ``effllm.pruning.config``; when they stop the loop above the budget, ``floor_hit`` is set and
the groups already picked stand (pruning never raises mid-training).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import PruningConfig
from .groups import GroupType, ModelShapes, block_units


@dataclass
class Choice:
    """One selected group. ``positions``: unit positions in the model as it was when selection began."""

    type: GroupType
    layer: int | None
    positions: tuple[int, ...]
    size: int
    saliency: float
    density: float
    params_after: int


@dataclass
class Selection:
    choices: list[Choice]
    params_before: int
    params_after: int
    floor_hit: bool


class _Candidates:
    """The next removable units of one (type, layer), in saliency order."""

    def __init__(self, scores: np.ndarray):
        self.scores = np.asarray(scores, dtype=np.float64)
        self.order = np.argsort(self.scores, kind="stable")
        self.ptr = 0
        self._cache: tuple[int, tuple[int, ...], float] | None = None

    def peek(self, n: int) -> tuple[tuple[int, ...], float]:
        if self._cache is None or self._cache[0] != n:
            pos = self.order[self.ptr : self.ptr + n]
            self._cache = (n, tuple(int(p) for p in pos), float(self.scores[pos].sum()))
        return self._cache[1], self._cache[2]

    def pop(self, n: int) -> None:
        self.ptr += n
        self._cache = None


def select_groups(
    shapes: ModelShapes, scores: dict, budget: int, cfg: PruningConfig, exact: bool = False
) -> Selection:
    """Pick lowest-density groups until ``shapes.total() <= budget`` or the floors stop it.

    ``exact``: the budget is the final target, so land on it: when the lowest-density group would
    overshoot it by more than the smallest group, take the lowest-density group that fits instead
    (at most the smallest group's size under the target). Only for the last selection: applied at
    every prune step it would keep large groups (a KV head, a stem channel) out of reach for good.
    """
    shapes = shapes.copy()
    params = before = shapes.total()
    n_layers, gran = shapes.num_layers, cfg.granularity
    attn = [_Candidates(s) for s in scores["attention"]]
    ffn = [_Candidates(s) for s in scores["ffn"]]
    stem = _Candidates(np.asarray(scores["stem"], dtype=np.float64) * cfg.stem_price)
    extra = np.asarray(scores.get("ffn_extra", np.zeros(n_layers)), dtype=np.float64)
    for i in range(n_layers):
        if attn[i].scores.size != shapes.kv_heads[i] or ffn[i].scores.size != shapes.ffn[i]:
            raise ValueError(f"layer {i}: saliency scores do not match the model's shapes")
    if stem.scores.size != shapes.hidden:
        raise ValueError("stem saliency does not match the hidden size")
    hidden_floor = cfg.hidden_floor()
    choices: list[Choice] = []
    floor_hit = False
    while params > budget:
        candidates = []
        total_kv = sum(shapes.kv_heads)
        for i in range(n_layers):
            if (
                shapes.kv_heads[i]
                and total_kv > 1
                and shapes.heads[i] - shapes.group_size(i) >= cfg.min_heads_per_layer
            ):
                pos, sal = attn[i].peek(1)
                size = shapes.attention_size(i)
                candidates.append(((sal / size, 0, i, pos[0]), (GroupType.ATTENTION, i, 1, pos, sal, size)))
            width = shapes.ffn[i]
            if width:
                n = block_units(width, gran)
                if width - n >= cfg.min_ffn_per_layer:
                    pos, sal = ffn[i].peek(n)
                    if n == width:
                        sal += float(extra[i])
                    size = shapes.ffn_size(i, n)
                    candidates.append(((sal / size, 1, i, min(pos)), (GroupType.FFN, i, n, pos, sal, size)))
        n = block_units(shapes.hidden, gran)
        if shapes.hidden - n >= hidden_floor:
            pos, sal = stem.peek(n)
            size = shapes.stem_size(n)
            candidates.append(((sal / size, 2, n_layers, min(pos)), (GroupType.STEM, None, n, pos, sal, size)))
        if not candidates:
            floor_hit = True
            break
        best = min(candidates)[1]
        if exact:
            excess, slack = params - budget, min(c[1][5] for c in candidates)
            if best[5] > excess + slack:
                best = min(c for c in candidates if c[1][5] <= excess + slack)[1]
        kind, layer, n, pos, sal, size = best
        removed = shapes.remove(kind, layer, n)
        assert removed == size
        params -= size
        cands = attn[layer] if kind == GroupType.ATTENTION else ffn[layer] if kind == GroupType.FFN else stem
        cands.pop(n)
        choices.append(Choice(kind, layer, tuple(sorted(pos)), size, sal, sal / size, params))
    return Selection(choices=choices, params_before=before, params_after=params, floor_hit=floor_hit)


__all__ = ["Choice", "Selection", "select_groups"]
