"""Which slices of which parameters each minimal group owns (docs/method.md "Pruning space").

The one table: saliency sums g*w over these slices, surgery cuts them, OBS compensates the
weights whose input columns they are. A new weight (a bias, a norm) is one more ``Part`` here.

A ``Part`` is one parameter and its ``Axis`` list: per dimension (0: rows or a vector's
entries, 1: columns), the group type whose units own the entries along it, ``width`` consecutive
entries each. Attention units are KV-head groups: G*hd rows of q_proj and columns of o_proj (KV
head j serves query heads j*G..j*G+G-1), hd rows of k_proj and v_proj. FFN and stem units are
single entries.

- attention block (``self_attn``, ``input_layernorm``): q/k/v rows and biases, o_proj columns;
- FFN block (``mlp``, ``post_attention_layernorm``): gate/up rows and biases, down_proj columns;
- stem: embedding columns (and an untied lm_head's), every RMSNorm entry, q/k/v/gate/up
  columns, o_proj/down_proj rows and bias entries.

A block whose last unit goes takes every parameter of its modules (``BLOCKS``) with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .groups import GroupType

ATTENTION, FFN, STEM = GroupType.ATTENTION, GroupType.FFN, GroupType.STEM

# The modules a decoder layer loses, set to None, with the last unit of each block type.
BLOCKS = {ATTENTION: ("self_attn", "input_layernorm"), FFN: ("mlp", "post_attention_layernorm")}


class Axis(NamedTuple):
    """One dimension of a parameter and the group type whose units own its entries, ``width`` each."""

    dim: int  # 0: rows (or a vector's entries), 1: columns
    owner: GroupType
    width: int = 1


@dataclass(frozen=True)
class Part:
    """One parameter and who owns it, dimension by dimension."""

    name: str  # relative to the decoder (model.model), or "lm_head.weight"
    param: nn.Parameter
    axes: tuple[Axis, ...]
    # For a Linear weight: the module whose forward input its columns multiply (q/k/v share one
    # input, gate/up another), where OBS collects X^T X. None for an embedding or a vector.
    reads: nn.Module | None = None
    # An output bias: it leaves with the block's last unit and shifts the output until then, so
    # that unit's saliency includes it.
    block_bias: bool = False


def units(layer) -> dict[GroupType, int]:
    """KV-head groups and FFN channels of a decoder layer (0 for a block it no longer has)."""
    attn, mlp = layer.self_attn, layer.mlp
    return {
        ATTENTION: attn.num_kv_heads if attn is not None else 0,
        FFN: mlp.gate_proj.weight.shape[0] if mlp is not None else 0,
    }


def expand_rows(kept: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """Unit positions -> the entries they own along their dimension, ``width`` each."""
    if kept is None or width == 1:
        return kept
    return (kept[:, None] * width + torch.arange(width, device=kept.device)).flatten()


def _linear(name: str, proj: nn.Linear, rows: Axis, cols: Axis, reads: nn.Module) -> list[Part]:
    out = [Part(f"{name}.weight", proj.weight, (rows, cols), reads)]
    if proj.bias is not None:  # a bias entry belongs with its output row
        out.append(Part(f"{name}.bias", proj.bias, (rows,), block_bias=rows.owner == STEM))
    return out


def _norm(name: str, norm) -> Part:
    return Part(f"{name}.weight", norm.weight, (Axis(0, STEM),))


def block_parts(layer, index: int, kind: GroupType) -> list[Part]:
    """The parameters of one block of decoder layer ``index`` ([] when the layer has lost it)."""
    pre = f"layers.{index}."
    if kind == ATTENTION:
        attn = layer.self_attn
        if attn is None:
            return []
        kv = Axis(0, ATTENTION, attn.head_dim)
        q = Axis(0, ATTENTION, attn.num_heads // attn.num_kv_heads * attn.head_dim)
        x_in, x_out = Axis(1, STEM), Axis(0, STEM)
        return [
            _norm(pre + "input_layernorm", layer.input_layernorm),
            *_linear(pre + "self_attn.q_proj", attn.q_proj, q, x_in, attn.q_proj),
            *_linear(pre + "self_attn.k_proj", attn.k_proj, kv, x_in, attn.q_proj),
            *_linear(pre + "self_attn.v_proj", attn.v_proj, kv, x_in, attn.q_proj),
            *_linear(pre + "self_attn.o_proj", attn.o_proj, x_out, q._replace(dim=1), attn.o_proj),
        ]
    mlp = layer.mlp
    if mlp is None:
        return []
    x_in, x_out = Axis(1, STEM), Axis(0, STEM)
    return [
        _norm(pre + "post_attention_layernorm", layer.post_attention_layernorm),
        *_linear(pre + "mlp.gate_proj", mlp.gate_proj, Axis(0, FFN), x_in, mlp.gate_proj),
        *_linear(pre + "mlp.up_proj", mlp.up_proj, Axis(0, FFN), x_in, mlp.gate_proj),
        *_linear(pre + "mlp.down_proj", mlp.down_proj, x_out, Axis(1, FFN), mlp.down_proj),
    ]


def outer_parts(model) -> list[Part]:
    """The stem's parameters outside the layers: embedding, lm_head unless tied (one parameter), final norm."""
    inner = model.model
    out = [Part("embed_tokens.weight", inner.embed_tokens.weight, (Axis(1, STEM),))]
    if model.lm_head.weight is not inner.embed_tokens.weight:
        out.append(Part("lm_head.weight", model.lm_head.weight, (Axis(1, STEM),), model.lm_head))
    out.append(_norm("norm", inner.norm))
    return out


__all__ = ["BLOCKS", "Axis", "Part", "block_parts", "expand_rows", "outer_parts", "units"]
