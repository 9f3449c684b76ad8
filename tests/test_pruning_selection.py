"""Groups and their sizes, selection by density, floors, granularity, the schedule, one-shot pruning."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import IRREGULAR, tiny_config, tiny_model

from effllm.model.params import count_module_parameters, count_parameters
from effllm.pruning import (
    GroupType,
    ModelShapes,
    ParameterBudget,
    Pruner,
    PruningConfig,
    enumerate_groups,
    one_shot_prune,
)

GQA = dict(num_attention_heads=[4, 6, 8, 3], num_key_value_heads=[4, 2, 2, 1], intermediate_size=[40, 24, 0, 33])
VARIANTS = {
    "gqa": GQA,
    "irregular-untied-bias": dict(**IRREGULAR, tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
    "uniform": {},
}


def _saliency(model, pruner, steps=2, seed=0):
    model.train()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(1, 512, (2, 12), generator=gen)
        model(ids, labels=ids).loss.backward()
        pruner.update_saliency()
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_group_sizes_equal_the_parameters_removed(variant):
    model = tiny_model(**VARIANTS[variant])
    shapes = ModelShapes.from_config(model.config)
    assert shapes.total() == count_parameters(model.config).total == count_module_parameters(model)
    groups = enumerate_groups(model)
    kinds = {g.type for g in groups}
    assert kinds == {GroupType.ATTENTION, GroupType.FFN, GroupType.STEM}
    # every unit type of every layer, including a layer's last unit (which takes the norm with it)
    picks = {}
    for g in groups:
        picks.setdefault((g.type, g.layer), []).append(g)
    for (kind, layer), units in picks.items():
        for unit in (units[0], units[-1]) if len(units) > 1 else units[:1]:
            m = copy.deepcopy(model)
            before = count_module_parameters(m)
            Pruner(m).remove_groups([unit])
            assert before - count_module_parameters(m) == unit.size, (kind, layer)
        if len(units) > 1:  # remove all but one, then the last one
            m = copy.deepcopy(model)
            p = Pruner(m)
            p.remove_groups([(kind, layer, i) for i in range(len(units) - 1)])
            last = [g for g in p.groups() if g.type == kind and g.layer == layer]
            if kind == GroupType.STEM:
                continue  # the last hidden channel cannot go
            assert len(last) == 1
            before = count_module_parameters(m)
            p.remove_groups(last)
            assert before - count_module_parameters(m) == last[0].size


def test_last_hidden_channel_is_never_removed():
    model = tiny_model(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    pruner = Pruner(model, PruningConfig(granularity=1))  # single channels, down to the last one
    with pytest.raises(ValueError, match="every hidden channel"):
        pruner.remove_groups([("stem", None, i) for i in range(8)])
    records = pruner.prune_to(0)
    assert model.config.hidden_size == 1 and pruner.floor_hit and records[-1]["floor_hit"]
    assert model.model.layers[0].self_attn is not None  # the model's last attention group stays
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize(
    "cfg",
    [
        PruningConfig(min_heads_per_layer=3, min_ffn_per_layer=20, min_hidden_size=40),
        PruningConfig(granularity=8, min_ffn_per_layer=10),
        PruningConfig(),
    ],
    ids=["floors", "granularity-8", "no-floors"],
)
def test_floors_and_min_params(cfg):
    model = tiny_model(**GQA)
    pruner = Pruner(model, cfg)
    _saliency(model, pruner)
    start = model.config.layer_shapes()
    floor = pruner.min_params()
    records = pruner.prune_to(0, step=1)  # far below the floors: must stop there without raising
    assert records and pruner.floor_hit and all(r["floor_hit"] for r in records)
    params = count_parameters(model.config).total
    assert params == count_module_parameters(model) == records[-1]["params_after"]
    assert params >= floor
    for (h0, _, f0), (h, _, f) in zip(start, model.config.layer_shapes()):
        assert h >= min(h0, cfg.min_heads_per_layer) and f >= min(f0, cfg.min_ffn_per_layer)
        if f != f0:
            assert f % cfg.granularity == 0
    assert model.config.hidden_size >= max(cfg.min_hidden_size or 1, cfg.granularity)
    assert model.config.hidden_size % cfg.granularity == 0
    assert any(h for h, _, _ in model.config.layer_shapes())
    if cfg.min_heads_per_layer:  # no global guard in play: the greedy reaches the floor exactly
        assert params == floor
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))


def test_granularity_blocks():
    model = tiny_model(**GQA)
    pruner = Pruner(model, PruningConfig(granularity=16))
    _saliency(model, pruner)
    records = pruner.prune_to(int(count_parameters(model.config).total * 0.75))
    for r in records:
        if r["type"] != "attention":
            assert len(r["indices"]) in (16, 8, 1), r  # 33 loses 1 first (-> 32), 40 loses 8 (-> 32)
            assert r["index"] == min(r["indices"])
    for _, _, f in model.config.layer_shapes():
        assert f % 16 == 0 or f in (40, 33)
    assert model.config.hidden_size % 16 == 0


def test_selection_picks_lowest_density_and_is_deterministic():
    runs = []
    for _ in range(2):
        model = tiny_model(**GQA)
        pruner = Pruner(model)
        _saliency(model, pruner, steps=3)
        scores = pruner.scores()
        shapes = pruner.shapes()
        records = pruner.prune_to(count_parameters(model.config).total - 1)
        runs.append(records)
        # the one group removed is the least dense of all candidates
        assert len(records) == 1
        r = records[0]
        best = min(
            [scores["attention"][i].min() / shapes.attention_size(i) for i in range(4) if shapes.kv_heads[i]]
            + [scores["ffn"][i].min() / shapes.ffn_size(i, 1) for i in range(4) if shapes.ffn[i]]
            + [scores["stem"].min() / shapes.stem_size(1)]
        )
        assert r["density"] == pytest.approx(best)
    assert runs[0] == runs[1]
    # with no saliency at all, ties are broken by (type, layer, index): still deterministic
    a, b = tiny_model(**GQA), tiny_model(**GQA)
    assert Pruner(a).prune_to(50_000) == Pruner(b).prune_to(50_000)


def test_linear_budget():
    sched = ParameterBudget(1000, 400, start_tokens=100, end_tokens=700)
    assert sched.budget(0) == 1000 and sched.budget(100) == 1000
    assert sched.budget(400) == 700 and sched.budget(101) == 999
    assert sched.budget(700) == 400 and sched.budget(10**9) == 400
    values = [sched.budget(t) for t in range(0, 800, 7)]
    assert values == sorted(values, reverse=True)
    assert ParameterBudget(10, 5, 3, 3).budget(3) == 5
    with pytest.raises(ValueError, match="larger than source"):
        ParameterBudget(10, 20, 0, 5)


def test_schedule_keeps_params_within_one_group_of_the_budget():
    model = tiny_model(**GQA, tie_word_embeddings=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = Pruner(model, PruningConfig(granularity=1), optimizer=opt)  # single channels: a fine budget track
    source = count_parameters(model.config).total
    sched = ParameterBudget(source, source // 3, start_tokens=0, end_tokens=40 * 24)
    gen = torch.Generator().manual_seed(0)
    steps_with_removals = 0
    for step in range(1, 45):
        ids = torch.randint(1, 512, (2, 12), generator=gen)
        model(ids, labels=ids).loss.backward()
        pruner.update_saliency()
        opt.step()
        opt.zero_grad()
        tokens = step * ids.numel()
        budget = sched.budget(tokens)
        largest = pruner.largest_group_size()
        records = pruner.prune_to(budget, step=step, tokens=tokens, batch=ids)
        steps_with_removals += bool(records)
        params = count_parameters(model.config).total
        assert params == count_module_parameters(model)
        assert budget - largest < params <= budget, (step, budget, largest, params)
        for r in records:
            assert r["step"] == step and r["tokens"] == tokens
    assert params <= source // 3 and steps_with_removals > 20
    types = {r["type"] for r in pruner.log}
    assert types == {"attention", "ffn", "stem"}, types


@pytest.mark.parametrize("weight_update", ["none", "obs"])
def test_one_shot_prune(weight_update):
    model = tiny_model(**GQA, tie_word_embeddings=False)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(1, 512, (2, 13), generator=gen) for _ in range(4)]
    source = count_parameters(model.config).total
    target = source // 2
    largest = ModelShapes.from_config(model.config).largest_group_size()
    records = one_shot_prune(model, batches, target, PruningConfig(weight_update=weight_update))
    params = count_parameters(model.config).total
    assert target - largest < params <= target == source // 2
    assert records[-1]["params_after"] == params == count_module_parameters(model)
    assert not model.training and all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(batches[0]).logits).all()


def test_obs_without_a_batch_falls_back_to_plain_removal(caplog):
    model = tiny_model(**GQA)
    pruner = Pruner(model, PruningConfig(weight_update="obs"))
    _saliency(model, pruner)
    with caplog.at_level("WARNING"):
        records = pruner.prune_to(count_parameters(model.config).total - 5000)
    assert records and "needs the current batch" in caplog.text


def test_cubic_budget_front_loads_and_meets_the_same_ends():
    linear = ParameterBudget(10_000, 1_000, start_tokens=100, end_tokens=1_100)
    cubic = ParameterBudget(10_000, 1_000, start_tokens=100, end_tokens=1_100, curve="cubic")
    points = range(0, 1_300, 13)
    assert [cubic.budget(t) for t in points] == sorted((cubic.budget(t) for t in points), reverse=True)
    assert cubic.budget(100) == linear.budget(100) == 10_000 and cubic.budget(1_100) == linear.budget(1_100) == 1_000
    assert all(cubic.budget(t) < linear.budget(t) for t in range(150, 1_100, 50))
    assert cubic.budget(600) == 1_000 + 9_000 // 8  # half the phase: (1 - 1/2)^3 of the drop left
    with pytest.raises(ValueError, match="budget curve"):
        ParameterBudget(10, 5, 0, 5, curve="exponential")


def _scores(shapes: ModelShapes, attention=1.0, ffn=1.0, stem=1.0) -> dict:
    """Uniform per-unit saliency per type, scaled so the densities are attention < ffn < stem by default."""
    return {
        "attention": [np.full(k, attention * shapes.attention_size(i)) for i, k in enumerate(shapes.kv_heads)],
        "ffn": [np.full(f, ffn * shapes.ffn_size(i, 1)) for i, f in enumerate(shapes.ffn)],
        "stem": np.full(shapes.hidden, stem * shapes.stem_size(1)),
        "ffn_extra": np.zeros(shapes.num_layers),
    }


def test_exact_selection_lands_within_the_smallest_group_of_the_target():
    from effllm.pruning.selection import select_groups

    shapes = ModelShapes.from_config(tiny_config(**GQA))
    scores = _scores(shapes, attention=1.0, ffn=2.0, stem=3.0)  # a KV group is the cheapest by density
    budget = shapes.total() - 100  # far less than one attention group
    plain = select_groups(shapes, scores, budget, PruningConfig())
    exact = select_groups(shapes, scores, budget, PruningConfig(), exact=True)
    assert plain.choices[0].type == GroupType.ATTENTION and budget - plain.params_after > 3_000
    smallest = min(shapes.ffn_size(i, 1) for i, f in enumerate(shapes.ffn) if f)
    assert exact.params_after <= budget < exact.params_after + 2 * smallest
    assert {c.type for c in exact.choices} == {GroupType.FFN}


def test_stem_price_moves_hidden_channels_ahead():
    from effllm.pruning.selection import select_groups

    shapes = ModelShapes.from_config(tiny_config(**GQA))
    scores = _scores(shapes, attention=3.0, ffn=2.0, stem=2.5)  # stem a little denser than FFN
    budget = shapes.total() - 3 * shapes.stem_size(1)
    assert select_groups(shapes, scores, budget, PruningConfig()).choices[0].type == GroupType.FFN
    cheap = select_groups(shapes, scores, budget, PruningConfig(stem_price=0.5))
    assert cheap.choices[0].type == GroupType.STEM and cheap.params_after <= budget
    with pytest.raises(ValueError, match="stem_price"):
        PruningConfig(stem_price=0)


def test_first_order_scores_and_group_fisher_follow_their_formulas():
    model = tiny_model(**GQA).train()
    ids = torch.randint(1, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    model(ids, labels=ids).loss.backward()
    n_tokens = 2 * 11
    per_token = Pruner(model, PruningConfig(), mode="mean")
    group = Pruner(model, PruningConfig(fisher="group"), mode="mean")
    first = Pruner(model, PruningConfig(taylor_order=1), mode="mean")
    for p in (per_token, group, first):
        p.update_saliency(tokens=n_tokens)
    mlp = model.model.layers[0].mlp
    gw = [(w.grad * w.detach()).double() for w in (mlp.gate_proj.weight, mlp.up_proj.weight)]
    down = (mlp.down_proj.weight.grad * mlp.down_proj.weight.detach()).double()
    a = float(gw[0][5].sum() + gw[1][5].sum() + down[:, 5].sum())
    b_elementwise = float((gw[0][5] ** 2).sum() + (gw[1][5] ** 2).sum() + (down[:, 5] ** 2).sum())
    assert per_token.scores()["ffn"][0][5] == pytest.approx(abs(-a + n_tokens * b_elementwise / 2), rel=1e-4)
    assert group.scores()["ffn"][0][5] == pytest.approx(abs(-a + n_tokens * a * a / 2), rel=1e-4)
    assert first.scores()["ffn"][0][5] == pytest.approx(abs(a), rel=1e-4)
