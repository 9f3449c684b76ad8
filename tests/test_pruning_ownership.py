"""The ownership table agrees with the model and with docs/method.md "Pruning space".

Every parameter is in the table exactly once, owned along the dimensions the docs name, its
widths tile the parameter, a block's parts are its modules' parameters, and what one group owns
adds up to what groups.py prices it at.
"""

from __future__ import annotations

import pytest
from conftest import tiny_model

from effllm.pruning import GroupType, ModelShapes, Pruner
from effllm.pruning.ownership import BLOCKS, block_parts, outer_parts, units

A, F, S = GroupType.ATTENTION, GroupType.FFN, GroupType.STEM
GQA = dict(num_attention_heads=[4, 6, 8, 3], num_key_value_heads=[4, 2, 2, 1], intermediate_size=[40, 24, 0, 33])

# docs/method.md, by parameter name: dimension -> owner (0: rows / a vector's entries, 1: columns)
QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")
DOCS = {
    "embed_tokens.weight": {1: S},
    "lm_head.weight": {1: S},
    **{f"{norm}.weight": {0: S} for norm in ("norm", "input_layernorm", "post_attention_layernorm")},
    **{f"{proj}.weight": {0: A, 1: S} for proj in QKV},
    **{f"{proj}.bias": {0: A} for proj in QKV},
    "o_proj.weight": {0: S, 1: A},
    **{f"{proj}.weight": {0: F, 1: S} for proj in GATE_UP},
    **{f"{proj}.bias": {0: F} for proj in GATE_UP},
    "down_proj.weight": {0: S, 1: F},
    "down_proj.bias": {0: S},
}


def _model(variant: str):
    if variant == "tied":
        return tiny_model(**GQA)
    model = tiny_model(**GQA, tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    if variant == "pruned":  # empty blocks, fewer heads and channels, a narrower stem
        Pruner(model).remove_groups(
            [("attention", 3, 0), ("attention", 2, 1), ("ffn", 1, 3)]
            + [("ffn", 0, j) for j in range(40)]
            + [("stem", None, c) for c in (0, 9)]
        )
    return model


@pytest.mark.parametrize("variant", ["tied", "untied-bias", "pruned"])
def test_every_parameter_is_owned_as_the_docs_say(variant):
    model = _model(variant)
    inner, shapes = model.model, ModelShapes.from_config(model.config)
    names = {id(p): n.removeprefix("model.") for n, p in model.named_parameters()}  # a tied weight: once
    seen = []
    for i, layer in enumerate(inner.layers):
        n = units(layer)
        assert (n[A], n[F]) == (shapes.kv_heads[i], shapes.ffn[i])
        for kind in (A, F):
            parts = block_parts(layer, i, kind)
            modules = [getattr(layer, attr) for attr in BLOCKS[kind]]
            assert {id(p) for m in modules if m is not None for p in m.parameters()} == {id(p.param) for p in parts}
            if not n[kind]:
                assert parts == [] and all(m is None for m in modules)
                continue
            # what one unit owns, entry by entry, is what removing it costs (less the block's norm)
            owned = sum(p.param.numel() // n[kind] for p in parts for axis in p.axes if axis.owner == kind)
            if kind == A:
                last = shapes.hidden if n[A] == 1 else 0
                assert owned == shapes.attention_size(i) - last
            else:
                last = shapes.hidden * (2 if shapes.mlp_bias else 1) if n[F] == 1 else 0
                assert owned == shapes.ffn_size(i, 1) - last
            seen += parts
    seen += outer_parts(model)
    assert sorted(names[id(p.param)] for p in seen) == sorted(names.values())  # each parameter exactly once
    stem_owned = 0
    for part in seen:
        assert part.name == names[id(part.param)]
        assert {axis.dim: axis.owner for axis in part.axes} == DOCS[".".join(part.name.split(".")[-2:])], part.name
        for axis in part.axes:
            n = shapes.hidden if axis.owner == S else units(inner.layers[int(part.name.split(".")[1])])[axis.owner]
            assert part.param.shape[axis.dim] == n * axis.width, part.name  # its units tile the dimension
            if axis.owner == S:
                stem_owned += part.param.numel() // shapes.hidden
    assert stem_owned == shapes.stem_channel_size()
