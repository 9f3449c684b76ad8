"""Minimal parameter groups (docs/method.md "Pruning space") and what removing each one costs.

Three types, for any EfficientLLM model (irregular shapes, GQA ratios per layer, empty layers):

- ``attention``: one KV head of layer l with its G_l = heads/kv_heads query heads: h rows of
  k_proj and v_proj, the G_l*h rows of q_proj (KV head j serves query heads j*G_l..j*G_l+G_l-1),
  their biases, and the matching G_l*h columns of o_proj.
- ``ffn``: channel j of layer l: row j of gate_proj and up_proj (and their biases), column j of
  down_proj.
- ``stem``: residual channel c, global: column c of the embedding (and of an untied lm_head),
  entry c of every RMSNorm weight, column c of q/k/v/gate/up and row c of o_proj/down_proj (and
  entry c of the down_proj bias) in every layer.

The last attention group of a layer takes the layer's input_layernorm with it, and the last FFN
channel its post_attention_layernorm (and the down_proj bias): those blocks become ``None``.
Sizes here are computed from shapes alone, and ``ModelShapes.total()`` equals
``effllm.model.params.count_parameters(config).total`` (a test checks it), so selection can price a
whole plan before any tensor is sliced.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from enum import Enum

from ..model.params import count_shapes


class GroupType(str, Enum):
    ATTENTION = "attention"
    FFN = "ffn"
    STEM = "stem"

    def __str__(self) -> str:  # records and logs show the plain name
        return self.value


@dataclass
class ModelShapes:
    """The shapes that decide every parameter count; mutable, so a plan can be priced step by step."""

    hidden: int
    heads: list[int]
    kv_heads: list[int]
    ffn: list[int]
    head_dim: int
    vocab: int
    tied: bool
    attention_bias: bool
    mlp_bias: bool

    @classmethod
    def from_config(cls, config) -> ModelShapes:
        shapes = config.layer_shapes()
        return cls(
            hidden=int(config.hidden_size),
            heads=[h for h, _, _ in shapes],
            kv_heads=[k for _, k, _ in shapes],
            ffn=[f for _, _, f in shapes],
            head_dim=int(config.head_dim),
            vocab=int(config.vocab_size),
            tied=bool(config.tie_word_embeddings),
            attention_bias=bool(config.attention_bias),
            mlp_bias=bool(config.mlp_bias),
        )

    def copy(self) -> ModelShapes:
        return copy.deepcopy(self)

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    def layer_shapes(self) -> list[tuple[int, int, int]]:
        return list(zip(self.heads, self.kv_heads, self.ffn))

    def group_size(self, layer: int) -> int:
        """Query heads per KV head in a layer (0 for a layer without attention)."""
        return self.heads[layer] // self.kv_heads[layer] if self.kv_heads[layer] else 0

    # ---- counts ---------------------------------------------------------------------------------
    def total(self) -> int:
        """Parameters of these shapes: effllm.model.params' formulas, the same ones every stage counts with."""
        return count_shapes(
            self.hidden, self.vocab, self.tied, self.head_dim, self.layer_shapes(), self.attention_bias, self.mlp_bias
        ).total

    # ---- the price of one group -----------------------------------------------------------------
    def attention_size(self, layer: int) -> int:
        """Parameters removed with one KV head of ``layer`` (and the layer's norm if it is the last one)."""
        g, hd, d = self.group_size(layer), self.head_dim, self.hidden
        size = d * hd * (2 + 2 * g) + (hd * (g + 2) if self.attention_bias else 0)
        if self.kv_heads[layer] == 1:
            size += d  # input_layernorm goes with the last group
        return size

    def ffn_size(self, layer: int, n: int = 1) -> int:
        """Parameters removed with ``n`` FFN channels of ``layer`` (plus norm and down bias if they are all)."""
        d = self.hidden
        size = 3 * d * n + (2 * n if self.mlp_bias else 0)
        if n == self.ffn[layer]:
            size += d + (d if self.mlp_bias else 0)
        return size

    def stem_channel_size(self) -> int:
        """Parameters of one residual channel across the whole model."""
        hd = self.head_dim
        size = self.vocab * (1 if self.tied else 2) + 1  # embedding (+ lm_head) columns, final norm
        for h, k, f in self.layer_shapes():
            if h:
                size += 1 + hd * (2 * h + 2 * k)  # input norm, q/k/v columns, o_proj rows
            if f:
                size += 1 + 3 * f + (1 if self.mlp_bias else 0)  # post norm, gate/up columns, down rows (+ bias)
        return size

    def stem_size(self, n: int = 1) -> int:
        return n * self.stem_channel_size()

    def size(self, kind: GroupType, layer: int | None, n: int = 1) -> int:
        if kind == GroupType.ATTENTION:
            return self.attention_size(layer)
        if kind == GroupType.FFN:
            return self.ffn_size(layer, n)
        return self.stem_size(n)

    def remove(self, kind: GroupType, layer: int | None, n: int = 1) -> int:
        """Apply the removal of one group of ``n`` units to the shapes; returns the parameters removed."""
        size = self.size(kind, layer, n)
        if kind == GroupType.ATTENTION:
            self.heads[layer] -= self.group_size(layer)
            self.kv_heads[layer] -= 1
        elif kind == GroupType.FFN:
            self.ffn[layer] -= n
        else:
            self.hidden -= n
        return size

    def largest_group_size(self, granularity: int = 1) -> int:
        """The most parameters one group can remove now (its layer's norm included)."""
        d = self.hidden
        sizes = [self.stem_size(min(granularity, d))]
        for i in range(self.num_layers):
            if self.kv_heads[i]:
                g, hd = self.group_size(i), self.head_dim
                sizes.append(d * hd * (2 + 2 * g) + (hd * (g + 2) if self.attention_bias else 0) + d)
            if self.ffn[i]:
                n = min(granularity, self.ffn[i])
                sizes.append(3 * d * n + d + ((2 * n + d) if self.mlp_bias else 0))
        return max(sizes)


def block_units(width: int, granularity: int) -> int:
    """Units the next group of a width takes: the remainder first, so the width becomes a multiple of N."""
    rem = width % granularity
    return rem if rem else min(granularity, width)


def floor_width(width: int, floor: int, granularity: int) -> int:
    """The smallest width reachable from ``width`` by removing blocks without going below ``floor``."""
    if width <= floor:
        return width
    reach = width - (width % granularity)  # after the remainder block
    if reach < floor:
        return width
    return max(floor + (-floor) % granularity, 0) if floor else 0


def floor_shapes(shapes: ModelShapes, cfg) -> ModelShapes:
    """The shapes selection would reach if it removed everything the floors and guards allow."""
    out = shapes.copy()
    n = cfg.granularity
    for i in range(out.num_layers):
        min_heads, min_ffn = cfg.layer_floors(out.group_size(i))
        k = out.kv_heads[i]
        if k:
            g = out.group_size(i)
            keep = k if out.heads[i] <= min_heads else -(-min_heads // g)
            out.kv_heads[i], out.heads[i] = keep, keep * g
        out.ffn[i] = floor_width(out.ffn[i], min_ffn, n)
    out.hidden = floor_width(out.hidden, cfg.hidden_floor(), n)
    if sum(out.kv_heads) == 0 and sum(shapes.kv_heads) > 0:
        # The last attention group of the model stays: keep the cheapest one.
        candidates = [i for i in range(out.num_layers) if shapes.kv_heads[i]]

        def cost(i: int) -> int:
            trial = out.copy()
            trial.kv_heads[i], trial.heads[i] = 1, shapes.group_size(i)
            return trial.total()

        best = min(candidates, key=lambda i: (cost(i), i))
        out.kv_heads[best], out.heads[best] = 1, shapes.group_size(best)
    return out


@dataclass(frozen=True)
class Group:
    """One minimal unit: a KV head group, an FFN channel or a stem channel.

    ``index`` is its position in the current model, ``original_index`` its index in the source
    model. ``size`` is what removing it alone costs now (for the last unit of a layer, that
    includes the layer's norm). With granularity N the selector removes N units of one layer as
    one group.
    """

    type: GroupType
    layer: int | None
    index: int
    original_index: int
    size: int


@dataclass
class IndexMaps:
    """Original (source-model) indices of the surviving units, per layer; sliced at every surgery."""

    attention: list[list[int]] = field(default_factory=list)
    ffn: list[list[int]] = field(default_factory=list)
    stem: list[int] = field(default_factory=list)

    @classmethod
    def identity(cls, shapes: ModelShapes) -> IndexMaps:
        return cls(
            attention=[list(range(k)) for k in shapes.kv_heads],
            ffn=[list(range(f)) for f in shapes.ffn],
            stem=list(range(shapes.hidden)),
        )

    def get(self, kind: GroupType, layer: int | None) -> list[int]:
        if kind == GroupType.ATTENTION:
            return self.attention[layer]
        if kind == GroupType.FFN:
            return self.ffn[layer]
        return self.stem

    def keep(self, kind: GroupType, layer: int | None, keep: list[int]) -> None:
        kept = [self.get(kind, layer)[i] for i in keep]
        if kind == GroupType.ATTENTION:
            self.attention[layer] = kept
        elif kind == GroupType.FFN:
            self.ffn[layer] = kept
        else:
            self.stem = kept

    def matches(self, shapes: ModelShapes) -> bool:
        return (
            [len(a) for a in self.attention] == shapes.kv_heads
            and [len(f) for f in self.ffn] == shapes.ffn
            and len(self.stem) == shapes.hidden
        )

    def state_dict(self) -> dict:
        return {
            "attention": [list(a) for a in self.attention],
            "ffn": [list(f) for f in self.ffn],
            "stem": list(self.stem),
        }

    @classmethod
    def from_state_dict(cls, sd: dict) -> IndexMaps:
        return cls(
            attention=[list(map(int, a)) for a in sd["attention"]],
            ffn=[list(map(int, f)) for f in sd["ffn"]],
            stem=list(map(int, sd["stem"])),
        )


def enumerate_groups(config, maps: IndexMaps | None = None) -> list[Group]:
    """Every minimal unit of a model (attention groups, FFN channels, stem channels) with its size.

    ``config`` is an EfficientLLMConfig (or a model, whose config is used). Units of one layer and
    type all cost the same, except the last one, which also takes the layer's norm.
    """
    config = getattr(config, "config", config)
    shapes = ModelShapes.from_config(config)
    maps = maps or IndexMaps.identity(shapes)
    out: list[Group] = []
    for i in range(shapes.num_layers):
        size = shapes.attention_size(i)
        for j in range(shapes.kv_heads[i]):
            out.append(Group(GroupType.ATTENTION, i, j, maps.attention[i][j], size))
        size = shapes.ffn_size(i, 1)
        for j in range(shapes.ffn[i]):
            out.append(Group(GroupType.FFN, i, j, maps.ffn[i][j], size))
    size = shapes.stem_size(1)
    for c in range(shapes.hidden):
        out.append(Group(GroupType.STEM, None, c, maps.stem[c], size))
    return out


__all__ = [
    "Group",
    "GroupType",
    "IndexMaps",
    "ModelShapes",
    "block_units",
    "enumerate_groups",
    "floor_shapes",
    "floor_width",
]
