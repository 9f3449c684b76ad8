"""Which groups go: the globally lowest saliency density, across types and layers (docs/method.md).

Groups of different types remove very different numbers of parameters, so they are compared by
density = saliency / parameters removed. Greedy, one group at a time, until the parameter count
is within the budget: every pick changes the shapes, hence the sizes (a stem channel shrinks
every other group, each FFN channel shrinks the stem group), so the densities are re-priced
after each pick. Within a (type, layer) all groups cost the same, so the candidate is the least
salient one; with granularity N it is the N least salient channels (the remainder first, so a
width becomes a multiple of N), scored by the sum of their saliencies.

With shape "uniform" (``PruningConfig.shape``) an attention or FFN move takes the least salient
group of every layer at once, so the layers keep one shape; see ``_uniform_moves``.

Deterministic: stable sorts, float64 scores, ties broken by (type, layer, position); given the
same (all-reduced) saliency, every rank selects the same groups. Floors and guards are documented
in ``effllm.pruning.config``; when they stop the loop above the budget, ``floor_hit`` is set and
the groups already picked stand (pruning never raises mid-training).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from effllm.model.configuration_effllm import uniform_shape

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


# One candidate move: the parts it removes together (kind, layer, units, positions, saliency, size) and
# its sort key (density first, then type, layer, position: deterministic ties). An irregular move has one
# part; a uniform move removes the same units from every layer at once.
Part = tuple
Move = tuple


def _irregular_moves(shapes: ModelShapes, cands: dict, extra: np.ndarray, cfg: PruningConfig) -> list[Move]:
    """One move per (type, layer): its least salient group, as the method prices them."""
    moves = []
    total_kv = sum(shapes.kv_heads)
    for i in range(shapes.num_layers):
        if shapes.kv_heads[i] and total_kv > 1 and shapes.heads[i] - shapes.group_size(i) >= cfg.min_heads_per_layer:
            pos, sal = cands["attention"][i].peek(1)
            size = shapes.attention_size(i)
            moves.append(((sal / size, 0, i, pos[0]), [(GroupType.ATTENTION, i, 1, pos, sal, size)]))
        width = shapes.ffn[i]
        if width:
            n = block_units(width, cfg.granularity)
            if width - n >= cfg.min_ffn_per_layer:
                pos, sal = cands["ffn"][i].peek(n)
                if n == width:
                    sal += float(extra[i])
                size = shapes.ffn_size(i, n)
                moves.append(((sal / size, 1, i, min(pos)), [(GroupType.FFN, i, n, pos, sal, size)]))
    return moves


def _uniform_moves(shapes: ModelShapes, cands: dict, cfg: PruningConfig) -> list[Move]:
    """At most one attention move and one FFN move, each taking every layer's least salient group(s)
    (chosen per layer by rank), priced by their summed saliency over their summed size: the layers keep
    one shape, so the model stays a plain Llama. Every layer keeps a KV group and an FFN granule."""
    moves = []
    layers = range(shapes.num_layers)
    min_heads, min_ffn = cfg.layer_floors(shapes.group_size(0))
    if shapes.heads[0] - shapes.group_size(0) >= min_heads:
        parts = []
        for i in layers:
            pos, sal = cands["attention"][i].peek(1)
            parts.append((GroupType.ATTENTION, i, 1, pos, sal, shapes.attention_size(i)))
        moves.append((_density(parts, 0), parts))
    n = block_units(shapes.ffn[0], cfg.granularity)
    if shapes.ffn[0] - n >= min_ffn:
        parts = []
        for i in layers:
            pos, sal = cands["ffn"][i].peek(n)
            parts.append((GroupType.FFN, i, n, pos, sal, shapes.ffn_size(i, n)))
        moves.append((_density(parts, 1), parts))
    return moves


def _density(parts: list[Part], type_rank: int) -> tuple:
    return (sum(p[4] for p in parts) / sum(p[5] for p in parts), type_rank, 0, 0)


def check_uniform(shapes: ModelShapes) -> None:
    """ValueError unless every layer has the same heads, KV heads and FFN width (none of them zero)."""
    if uniform_shape(shapes.layer_shapes()) is None:
        raise ValueError(
            "shape 'uniform' needs a model whose layers all have the same nonzero shape "
            f"(got heads/KV heads/FFN {sorted(set(shapes.layer_shapes()))[:3]}...); "
            "start from the unpruned source or use shape 'irregular'"
        )


def select_groups(shapes: ModelShapes, scores: dict, budget: int, cfg: PruningConfig, exact: bool = False) -> Selection:
    """Pick lowest-density groups until ``shapes.total() <= budget`` or the floors stop it.

    ``cfg.shape == "uniform"`` removes attention groups and FFN channels from every layer at once
    (see ``_uniform_moves``); the stem is global either way.

    ``exact``: the budget is the final target, so land on it: when the lowest-density move would
    overshoot it by more than the smallest move, take the lowest-density move that fits instead
    (at most the smallest move's size under the target). Only for the last selection: applied at
    every prune step it would keep large groups (a KV head, a stem channel) out of reach for good.
    """
    shapes = shapes.copy()
    params = before = shapes.total()
    n_layers, gran = shapes.num_layers, cfg.granularity
    cands = {
        "attention": [_Candidates(s) for s in scores["attention"]],
        "ffn": [_Candidates(s) for s in scores["ffn"]],
        "stem": _Candidates(np.asarray(scores["stem"], dtype=np.float64) * cfg.stem_price),
    }
    extra = np.asarray(scores.get("ffn_extra", np.zeros(n_layers)), dtype=np.float64)
    for i in range(n_layers):
        if cands["attention"][i].scores.size != shapes.kv_heads[i] or cands["ffn"][i].scores.size != shapes.ffn[i]:
            raise ValueError(f"layer {i}: saliency scores do not match the model's shapes")
    if cands["stem"].scores.size != shapes.hidden:
        raise ValueError("stem saliency does not match the hidden size")
    uniform = cfg.shape == "uniform"
    if uniform:
        check_uniform(shapes)
    hidden_floor = cfg.hidden_floor()
    choices: list[Choice] = []
    floor_hit = False
    while params > budget:
        moves = _uniform_moves(shapes, cands, cfg) if uniform else _irregular_moves(shapes, cands, extra, cfg)
        n = block_units(shapes.hidden, gran)
        if shapes.hidden - n >= hidden_floor:
            pos, sal = cands["stem"].peek(n)
            size = shapes.stem_size(n)
            moves.append(((sal / size, 2, n_layers, min(pos)), [(GroupType.STEM, None, n, pos, sal, size)]))
        if not moves:
            floor_hit = True
            break
        best = min(moves)
        if exact:
            cost = lambda move: sum(p[5] for p in move[1])  # noqa: E731
            excess, slack = params - budget, min(cost(m) for m in moves)
            if cost(best) > excess + slack:
                best = min(m for m in moves if cost(m) <= excess + slack)
        density = best[0][0]
        for kind, layer, n, pos, sal, size in best[1]:
            removed = shapes.remove(kind, layer, n)
            assert removed == size
            params -= size
            stem_or_layer = cands["stem"] if kind == GroupType.STEM else cands[kind.value][layer]
            stem_or_layer.pop(n)
            choices.append(Choice(kind, layer, tuple(sorted(pos)), size, sal, density, params))
    return Selection(choices=choices, params_before=before, params_after=params, floor_hit=floor_hit)


__all__ = ["Choice", "Selection", "check_uniform", "select_groups"]
