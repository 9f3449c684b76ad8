"""Surgery: removal equals masking, GQA, empty layers, optimizer state, saliency EMAs, resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_model

from effllm import EfficientLLMForCausalLM
from effllm.model.params import count_module_parameters, count_parameters
from effllm.pruning import GroupType, Pruner, PruningConfig

# Different GQA ratio in every layer (G = 1, 3, 4, 3) and a layer without FFN.
GQA = dict(num_attention_heads=[4, 6, 8, 3], num_key_value_heads=[4, 2, 2, 1], intermediate_size=[40, 24, 0, 33])
HD = 16


def _mask(model, removal: dict) -> EfficientLLMForCausalLM:
    """A copy of ``model`` with the weights of the removed groups zeroed (the RMSNorm rescaled for stem removal)."""
    m = copy.deepcopy(model)
    inner = m.model
    with torch.no_grad():
        for layer, heads in removal.get("attention", {}).items():
            attn = inner.layers[layer].self_attn
            g = attn.num_heads // attn.num_kv_heads
            for j in heads:
                q = slice(j * g * HD, (j + 1) * g * HD)
                kv = slice(j * HD, (j + 1) * HD)
                attn.q_proj.weight[q] = 0
                attn.k_proj.weight[kv] = 0
                attn.v_proj.weight[kv] = 0
                attn.o_proj.weight[:, q] = 0
                for proj, rows in ((attn.q_proj, q), (attn.k_proj, kv), (attn.v_proj, kv)):
                    if proj.bias is not None:
                        proj.bias[rows] = 0
        for layer, channels in removal.get("ffn", {}).items():
            mlp = inner.layers[layer].mlp
            idx = torch.tensor(channels)
            mlp.gate_proj.weight[idx] = 0
            mlp.up_proj.weight[idx] = 0
            mlp.down_proj.weight[:, idx] = 0
            if mlp.gate_proj.bias is not None:
                mlp.gate_proj.bias[idx] = 0
                mlp.up_proj.bias[idx] = 0
                if len(channels) == mlp.gate_proj.weight.shape[0]:
                    mlp.down_proj.bias.zero_()  # the whole block goes, its bias with it
        stem = removal.get("stem", [])
        if stem:
            d = inner.embed_tokens.weight.shape[1]
            keep = d - len(stem)
            c = torch.tensor(stem)
            inner.embed_tokens.weight[:, c] = 0
            m.lm_head.weight[:, c] = 0
            norms = [inner.norm] + [
                n for layer in inner.layers for n in (layer.input_layernorm, layer.post_attention_layernorm) if n
            ]
            for norm in norms:
                norm.weight[c] = 0
                # physical removal averages over d-k channels: rescale weight and eps so masking is exact
                norm.weight.mul_(math.sqrt(keep / d))
                norm.variance_epsilon *= keep / d
            for layer in inner.layers:
                if layer.self_attn is not None:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.weight[:, c] = 0
                    layer.self_attn.o_proj.weight[c] = 0
                if layer.mlp is not None:
                    layer.mlp.gate_proj.weight[:, c] = 0
                    layer.mlp.up_proj.weight[:, c] = 0
                    layer.mlp.down_proj.weight[c] = 0
                    if layer.mlp.down_proj.bias is not None:
                        layer.mlp.down_proj.bias[c] = 0
    return m


def _groups(removal: dict) -> list[tuple]:
    out = []
    for layer, heads in removal.get("attention", {}).items():
        out += [("attention", layer, j) for j in heads]
    for layer, channels in removal.get("ffn", {}).items():
        out += [("ffn", layer, j) for j in channels]
    out += [("stem", None, c) for c in removal.get("stem", [])]
    return out


CASES = {
    "attention": {"attention": {0: [1, 3], 1: [0], 2: [1]}},
    "attention-layer-to-zero": {"attention": {3: [0], 1: [0, 1]}},
    "ffn": {"ffn": {0: [0, 7, 39], 1: [5, 6, 7, 8]}},
    "ffn-layer-to-zero": {"ffn": {3: list(range(33)), 0: [2]}},
    "stem": {"stem": [0, 5, 17, 63]},
    "everything": {"attention": {2: [0], 3: [0]}, "ffn": {1: list(range(24)), 3: [1, 2]}, "stem": [3, 4, 40]},
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("variant", ["tied", "untied-bias"])
def test_removal_equals_masking(case, variant):
    kw = dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True) if variant == "untied-bias" else {}
    model = tiny_model(**GQA, **kw)
    removal = CASES[case]
    masked = _mask(model, removal)
    pruner = Pruner(model, PruningConfig())
    before = count_parameters(model.config).total
    records = pruner.remove_groups(_groups(removal))
    after = count_parameters(model.config).total
    assert count_module_parameters(model) == after == records[-1]["params_after"]
    assert before - after == sum(r["size"] for r in records)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(1, 512, (2, 12))
    with torch.no_grad():
        diff = (model(ids).logits - masked(ids).logits).abs().max().item()
    assert diff <= 1e-5, diff
    # the module attributes follow the weights
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            assert (mod.out_features, mod.in_features) == tuple(mod.weight.shape)
    assert model.model.embed_tokens.embedding_dim == model.config.hidden_size


def test_gqa_rows_follow_their_kv_head():
    model = tiny_model(**GQA, attention_bias=True)
    attn = model.model.layers[2].self_attn  # 8 query heads on 2 KV heads: G = 4
    q, k, o = attn.q_proj.weight.clone(), attn.k_proj.weight.clone(), attn.o_proj.weight.clone()
    Pruner(model).remove_groups([("attention", 2, 0)])
    assert model.config.layer_shapes()[2] == (4, 1, 0)
    assert torch.equal(attn.q_proj.weight, q[4 * HD :]) and torch.equal(attn.k_proj.weight, k[HD:])
    assert torch.equal(attn.o_proj.weight, o[:, 4 * HD :])


def test_empty_layers_save_load_and_generate(tmp_path):
    model = tiny_model(**GQA)
    Pruner(model).remove_groups(_groups({"attention": {3: [0]}, "ffn": {0: list(range(40))}, "stem": [1, 2]}))
    layers = model.model.layers
    assert layers[3].self_attn is None and layers[3].input_layernorm is None
    assert layers[0].mlp is None and layers[0].post_attention_layernorm is None
    assert layers[2].mlp is None
    assert model.config.layer_shapes() == [(4, 4, 0), (6, 2, 24), (8, 2, 0), (0, 0, 33)]
    assert model.config.hidden_size == 62
    model.save_pretrained(tmp_path)
    again = EfficientLLMForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, 512, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    out = again.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert out.shape == (1, 11)


def _train(model, opt, steps, seed=0, pruner=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(1, 512, (2, 12), generator=gen)
        model(ids, labels=ids).loss.backward()
        if pruner is not None:
            pruner.update_saliency()
        opt.step()
        opt.zero_grad()


def _sliced_like(full: torch.Tensor, name: str, model_before, removal: dict) -> torch.Tensor:
    """The surviving part of a tensor of parameter ``name`` (attention/FFN removals only)."""
    parts = name.split(".")
    if "layers" not in parts:
        return full
    layer = int(parts[parts.index("layers") + 1])
    attn = model_before.model.layers[layer].self_attn
    heads = removal.get("attention", {}).get(layer, [])
    channels = removal.get("ffn", {}).get(layer, [])
    if heads and "self_attn" in parts:
        g = attn.num_heads // attn.num_kv_heads
        width = g * HD if parts[-2] in ("q_proj", "o_proj") else HD
        keep = [j for j in range(attn.num_kv_heads) if j not in heads]
        idx = torch.cat([torch.arange(j * width, (j + 1) * width) for j in keep])
        return full.index_select(1 if parts[-2] == "o_proj" else 0, idx)
    if channels and "mlp" in parts:
        width = model_before.model.layers[layer].mlp.gate_proj.weight.shape[0]
        idx = torch.tensor([j for j in range(width) if j not in channels])
        if parts[-2] == "down_proj":
            return full if parts[-1] == "bias" else full.index_select(1, idx)
        return full.index_select(0, idx)
    return full


@pytest.mark.parametrize("removal", [CASES["attention"], CASES["ffn-layer-to-zero"], CASES["everything"]], ids=str)
def test_optimizer_state_and_next_step_match_masking(removal):
    removal = {k: v for k, v in removal.items() if k != "stem"}  # stem: exact only up to the RMSNorm factor
    model = tiny_model(**GQA, mlp_bias=True).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _train(model, opt, 3)
    masked = _mask(model, removal).train()
    masked_opt = torch.optim.AdamW(masked.parameters(), lr=1e-2, weight_decay=0.1)
    masked_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # no shared tensors
    reference = copy.deepcopy(model)
    before = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}

    pruner = Pruner(model, PruningConfig(), optimizer=opt)
    pruner.remove_groups(_groups(removal))

    # the optimizer holds exactly the model's parameters, and their state is the sliced state
    params = list(model.parameters())
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in params}
    assert set(map(id, opt.state)) <= {id(p) for p in params}
    for name, p in model.named_parameters():
        for key, value in opt.state[p].items():
            expected = before[name][key]
            if value.dim():
                expected = _sliced_like(expected, name, reference, removal)
            assert torch.equal(value, expected), (name, key)

    # the next step: pruned model vs masked model, on the surviving weights
    ids = torch.randint(1, 512, (2, 12), generator=torch.Generator().manual_seed(9))
    for m, o in ((model, opt), (masked, masked_opt)):
        m(ids, labels=ids).loss.backward()
        o.step()
        o.zero_grad()
    masked_params = dict(masked.named_parameters())
    for name, p in model.named_parameters():
        expected = _sliced_like(masked_params[name].detach(), name, reference, removal)
        assert torch.allclose(p.detach(), expected, atol=1e-6), name
        exp_avg = _sliced_like(masked_opt.state[masked_params[name]]["exp_avg"], name, reference, removal)
        assert torch.allclose(opt.state[p]["exp_avg"], exp_avg, atol=1e-7), name


def test_stem_slices_optimizer_state_and_grads():
    model = tiny_model(**GQA, tie_word_embeddings=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train(model, opt, 2)
    ids = torch.randint(1, 512, (2, 12))
    model(ids, labels=ids).loss.backward()  # pending gradients are sliced too
    before = {n: (p.grad.clone(), opt.state[p]["exp_avg_sq"].clone()) for n, p in model.named_parameters()}
    Pruner(model, optimizer=opt).remove_groups([("stem", None, c) for c in (2, 30)])
    keep = torch.tensor([c for c in range(64) if c not in (2, 30)])
    for name, p in model.named_parameters():
        grad, sq = before[name]
        if name.endswith("norm.weight") or name.endswith("down_proj.bias"):
            dims = [0]
        elif "o_proj" in name or "down_proj" in name:
            dims = [0]
        else:
            dims = [1]
        for dim in dims:
            grad, sq = grad.index_select(dim, keep), sq.index_select(dim, keep)
        assert torch.equal(p.grad, grad) and torch.equal(opt.state[p]["exp_avg_sq"], sq), name
    opt.step()


def test_sgd_momentum_and_empty_param_group():
    model = tiny_model(**GQA).train()
    norms = [p for n, p in model.named_parameters() if "layers.3.input_layernorm" in n]
    rest = [p for n, p in model.named_parameters() if "layers.3.input_layernorm" not in n]
    opt = torch.optim.SGD([{"params": rest}, {"params": norms, "lr": 0.0}], lr=0.1, momentum=0.9)
    _train(model, opt, 2)
    Pruner(model, optimizer=opt).remove_groups([("attention", 3, 0), ("ffn", 1, 3)])
    assert opt.param_groups[1]["params"] == []  # the group stays (LR schedulers index groups)
    for p in model.parameters():
        if p in opt.state:
            assert opt.state[p]["momentum_buffer"].shape == p.shape
    _train(model, opt, 1)


def test_saliency_ema_sliced_with_the_model():
    model = tiny_model(**GQA).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = Pruner(model, optimizer=opt)
    _train(model, opt, 3, pruner=pruner)
    before = pruner.scores()
    pruner.remove_groups([("attention", 1, 0), ("ffn", 0, 5), ("stem", None, 7)])
    after = pruner.scores()
    assert list(after["attention"][1]) == [before["attention"][1][1]]
    assert list(after["ffn"][0]) == list(before["ffn"][0][[i for i in range(40) if i != 5]])
    assert list(after["stem"]) == list(before["stem"][[i for i in range(64) if i != 7]])
    assert pruner.maps.ffn[0][5] == 6 and pruner.maps.stem[7] == 8  # original numbering kept
    records = pruner.remove_groups([("ffn", 0, 5)])
    assert records[0]["index"] == 6


def _grads_step(model, pruner, opt, seed):
    ids = torch.randint(1, 512, (2, 12), generator=torch.Generator().manual_seed(seed))
    model(ids, labels=ids).loss.backward()
    pruner.update_saliency()
    opt.step()
    opt.zero_grad()


def test_resume_from_checkpoint_is_exact(tmp_path):
    model = tiny_model(**GQA).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = Pruner(model, PruningConfig(), optimizer=opt)
    for s in range(3):
        _grads_step(model, pruner, opt, s)
    source = count_parameters(model.config).total
    pruner.prune_to(int(source * 0.8), step=3, tokens=30)
    # checkpoint: model dir + optimizer + pruner state, in the files effllm's checkpoints use (no pickle)
    from effllm.training.state_files import load_state, save_state

    model.save_pretrained(tmp_path)
    save_state({"opt": opt.state_dict(), "pruner": pruner.state_dict()}, tmp_path, "state")
    resumed = EfficientLLMForCausalLM.from_pretrained(tmp_path).train()
    ropt = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    state = load_state(tmp_path, "state")
    ropt.load_state_dict(state["opt"])
    rpruner = Pruner(resumed, PruningConfig(), optimizer=ropt)
    rpruner.load_state_dict(state["pruner"])
    for s in range(3, 5):
        _grads_step(model, pruner, opt, s)
        _grads_step(resumed, rpruner, ropt, s)
    a = pruner.prune_to(int(source * 0.6), step=5, tokens=50)
    b = rpruner.prune_to(int(source * 0.6), step=5, tokens=50)
    assert a == b and len(a) > 0
    assert rpruner.log == pruner.log
    with pytest.raises(ValueError, match="does not match the model's shapes"):
        Pruner(tiny_model(**GQA)).load_state_dict(pruner.state_dict())


@pytest.mark.parametrize("fisher", ["per_token", "minibatch"])
def test_tracker_matches_a_per_group_reference(fisher):
    """The vectorized sums equal explicit per-group sums over masks."""
    model = tiny_model(**GQA, tie_word_embeddings=False, attention_bias=True, mlp_bias=True).train()
    pruner = Pruner(model, PruningConfig(fisher=fisher), mode="mean")
    ids = torch.randint(1, 512, (2, 12))
    with torch.no_grad():
        model(ids)  # not a training forward: not counted
    model(ids, labels=ids).loss.backward()
    pruner.update_saliency()
    tr = pruner.tracker
    prods = {n: (p.grad * p.detach()) for n, p in model.named_parameters()}
    scale = 24 if fisher == "per_token" else 1  # the Fisher term: squared mini-batch term times its tokens

    def both(parts):
        a = sum(t.sum() for t in parts)
        b = sum((t * t).sum() for t in parts) * scale
        return torch.stack([a, b])

    for i, layer in enumerate(model.model.layers):
        pre = f"model.layers.{i}."
        if layer.self_attn is not None:
            attn = layer.self_attn
            g = attn.num_heads // attn.num_kv_heads
            for j in range(attn.num_kv_heads):
                q, kv = slice(j * g * HD, (j + 1) * g * HD), slice(j * HD, (j + 1) * HD)
                parts = [prods[pre + "self_attn.o_proj.weight"][:, q]]
                for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                    parts += [
                        prods[pre + f"self_attn.{name}.weight"][rows],
                        prods[pre + f"self_attn.{name}.bias"][rows],
                    ]
                ref = both(parts)
                assert torch.allclose(torch.stack([tr.attn_a[i][j], tr.attn_b[i][j]]), ref, rtol=1e-4, atol=1e-10)
        if layer.mlp is not None:
            for j in range(layer.mlp.gate_proj.weight.shape[0]):
                parts = [prods[pre + "mlp.down_proj.weight"][:, j]]
                for name in ("gate_proj", "up_proj"):
                    parts += [prods[pre + f"mlp.{name}.weight"][j], prods[pre + f"mlp.{name}.bias"][j : j + 1]]
                ref = both(parts)
                assert torch.allclose(torch.stack([tr.ffn_a[i][j], tr.ffn_b[i][j]]), ref, rtol=1e-4, atol=1e-10)
    for c in [0, 13, 63]:
        parts = []
        for name, t in prods.items():
            if name.endswith("norm.weight") or name.endswith("down_proj.bias"):
                parts.append(t[c : c + 1])
            elif name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                parts.append(t[c])
            elif name.endswith(".weight"):
                parts.append(t[:, c])
        ref = both(parts)
        assert torch.allclose(torch.stack([tr.stem_a[c], tr.stem_b[c]]), ref, rtol=1e-4, atol=1e-10)


def test_bf16_model_keeps_float32_emas():
    model = tiny_model(**GQA).to(torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = Pruner(model, optimizer=opt)
    _train(model, opt, 2, pruner=pruner)
    assert pruner.tracker.stem_a.dtype == torch.float32 and pruner.tracker.ffn_b[0].dtype == torch.float32
    records = pruner.prune_to(int(count_parameters(model.config).total * 0.7))
    assert records and all(math.isfinite(r["saliency"]) for r in records)
    assert next(model.parameters()).dtype == torch.bfloat16
    _train(model, opt, 1, pruner=pruner)


def test_group_types_in_records():
    model = tiny_model(**GQA)
    recs = Pruner(model).remove_groups([(GroupType.ATTENTION, 0, 0), ("stem", None, 0)])
    assert [r["type"] for r in recs] == ["attention", "stem"] and recs[1]["layer"] is None
    assert set(recs[0]) >= {"step", "tokens", "type", "layer", "index", "size", "saliency", "density", "params_after"}
