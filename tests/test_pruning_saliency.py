"""Saliency means something, and the OBS update helps: on a tiny model trained on the corpus fixture.

The model (4 layers, d=64, 8 query heads on 4 KV heads, FFN 128, the 512-token tokenizer) trains
for 300 steps; the Pruner tracks its saliency EMA, as in training, over the last 120 steps. Each
group's true loss increase is then measured by removing it alone and evaluating on the last
training batches (the batches the EMA saw last).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import one_torch_thread, tiny_config
from scipy.stats import spearmanr

from effllm import EfficientLLMForCausalLM
from effllm.pruning import Pruner, PruningConfig

STEPS, TRACK, BATCH, SEQ, MEASURE_BATCHES = 300, 120, 16, 64, 4


@pytest.fixture(scope="module")
def trained(corpus, tokenizer):
    with one_torch_thread():  # tiny matrices: one thread is as fast, and immune to a busy machine
        ids = torch.tensor([t for text in corpus for t in tokenizer(text)["input_ids"] + [0]])
        torch.manual_seed(0)
        config = tiny_config(
            hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, intermediate_size=128
        )
        model = EfficientLLMForCausalLM(config).train()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
        warm = 30
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / STEPS)))
        )
        pruner = Pruner(model, PruningConfig(), optimizer=opt)
        gen = torch.Generator().manual_seed(0)
        starts = ids.numel() - SEQ - 1
        recent = []
        for step in range(STEPS):
            batch = torch.stack([ids[i : i + SEQ + 1] for i in torch.randint(0, starts, (BATCH,), generator=gen)])
            model(batch, labels=batch).loss.backward()
            if step >= STEPS - TRACK:
                pruner.update_saliency()
                recent.append(batch)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        model.eval()
        held_out = torch.stack([ids[i : i + SEQ + 1] for i in torch.randint(0, starts, (32,), generator=gen)])
        yield {"model": model, "pruner": pruner, "recent": recent, "held_out": held_out, "ids": ids}


def _loss(model, batches: torch.Tensor) -> float:
    with torch.no_grad():
        return float(np.mean([model(b, labels=b).loss.item() for b in batches.split(32)]))


def _zeroed(model, kind: str, layer: int, j: int):
    """Context: the weights of one attention group / FFN channel set to zero (exactly its removal)."""

    class Ctx:
        def __enter__(self):
            self.saved = []
            with torch.no_grad():
                if kind == "attention":
                    attn = model.model.layers[layer].self_attn
                    g, hd = attn.num_heads // attn.num_kv_heads, attn.head_dim
                    views = [attn.o_proj.weight[:, j * g * hd : (j + 1) * g * hd]]
                else:
                    views = [model.model.layers[layer].mlp.down_proj.weight[:, j]]
                for v in views:
                    self.saved.append((v, v.clone()))
                    v.zero_()
            return self

        def __exit__(self, *exc):
            with torch.no_grad():
                for v, old in self.saved:
                    v.copy_(old)

    return Ctx()


def test_saliency_predicts_the_loss_increase(trained):
    with one_torch_thread():
        model, pruner = trained["model"], trained["pruner"]
        batches = torch.cat(trained["recent"][-MEASURE_BATCHES:])
        base = _loss(model, batches)
        scores = pruner.scores()
        literal = _minibatch_fisher_scores(pruner)
        pairs = {"attention": [], "ffn": [], "stem": []}
        keys = {"attention": [], "ffn": [], "stem": []}
        for i in range(4):
            for j in range(4):
                with _zeroed(model, "attention", i, j):
                    pairs["attention"].append((scores["attention"][i][j], _loss(model, batches) - base))
                    keys["attention"].append(literal["attention"][i][j])
            for j in range(0, 128, 4):
                with _zeroed(model, "ffn", i, j):
                    pairs["ffn"].append((scores["ffn"][i][j], _loss(model, batches) - base))
                    keys["ffn"].append(literal["ffn"][i][j])
        for c in range(0, 64, 2):  # physically removed: includes the RMSNorm change of a real removal
            pruned = copy.deepcopy(model)
            Pruner(pruned).remove_groups([("stem", None, c)])
            pairs["stem"].append((scores["stem"][c], _loss(pruned, batches) - base))
            keys["stem"].append(literal["stem"][c])
    rho = {kind: spearmanr(*zip(*p)).statistic for kind, p in pairs.items()}
    print(
        f"\nSpearman(saliency, loss increase of removing the group alone), base loss {base:.3f}: "
        + ", ".join(f"{k} {v:.3f} (n={len(pairs[k])})" for k, v in rho.items())
    )
    # for the record: the literal Taylor formula, the squared mini-batch term unscaled (fisher="minibatch")
    rho_mb = {kind: spearmanr(keys[kind], [d for _, d in p]).statistic for kind, p in pairs.items()}
    print("  same run, fisher='minibatch': " + ", ".join(f"{k} {v:.3f}" for k, v in rho_mb.items()))
    for kind, value in rho.items():
        assert value >= 0.5, (kind, rho)


def _minibatch_fisher_scores(pruner) -> dict:
    """|-A + B/2| with B not scaled by the tokens per step (every step here had BATCH*(SEQ+1) tokens)."""
    tr = pruner.tracker
    n = BATCH * (SEQ + 1)

    def s(a, b):
        return ((-a + 0.5 * b / n).abs() * tr.correction()).tolist()

    return {
        "attention": [s(a, b) for a, b in zip(tr.attn_a, tr.attn_b)],
        "ffn": [s(a, b) for a, b in zip(tr.ffn_a, tr.ffn_b)],
        "stem": s(tr.stem_a, tr.stem_b),
    }


def _layer_io(model, module, batch):
    """Inputs and outputs of one linear module on a batch."""
    seen = {}
    handle = module.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), y=out.detach()))
    with torch.no_grad():
        model(batch)
    handle.remove()
    return seen["x"].reshape(-1, seen["x"].shape[-1]), seen["y"].reshape(-1, seen["y"].shape[-1])


CASES = {
    "ffn": ([("ffn", 1, j) for j in range(0, 128, 3)], lambda m: m.model.layers[1].mlp.down_proj),
    "attention": ([("attention", 2, 0)], lambda m: m.model.layers[2].self_attn.o_proj),
    "stem-q": ([("stem", None, c) for c in range(0, 64, 5)], lambda m: m.model.layers[0].self_attn.q_proj),
    "stem-gate": ([("stem", None, c) for c in range(0, 64, 5)], lambda m: m.model.layers[3].mlp.gate_proj),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_obs_lowers_the_layer_output_error(trained, case):
    groups, module_of = CASES[case]
    model = trained["model"]
    calib = torch.cat(trained["recent"][-4:])[:, :-1]
    held_out = trained["held_out"][:, :-1]
    x, y = _layer_io(model, module_of(model), held_out)  # the unpruned layer on held-out text
    errors = {}
    for update in ("none", "obs"):
        pruned = copy.deepcopy(model)
        Pruner(pruned, PruningConfig(weight_update=update)).remove_groups(groups, batch=calib)
        weight = module_of(pruned).weight.detach()
        kind = groups[0][0]
        removed = sorted(j for _, _, j in groups)
        if kind == "attention":
            attn = model.model.layers[groups[0][1]].self_attn
            width = attn.num_heads // attn.num_kv_heads * attn.head_dim
            removed = [c for j in removed for c in range(j * width, (j + 1) * width)]
        keep = [c for c in range(x.shape[1]) if c not in removed]
        out = x[:, keep] @ weight.T  # the surviving inputs through the pruned (and maybe updated) weight
        errors[update] = (out - y).pow(2).sum().item()
    print(f"\nOBS {case}: held-out output error {errors['obs']:.4g} vs plain removal {errors['none']:.4g}")
    assert errors["obs"] < 0.9 * errors["none"], errors


def test_one_shot_mean_equals_the_plain_average(trained):
    """One-shot saliency is the plain average of the per-batch statistics (no EMA decay)."""
    model = copy.deepcopy(trained["model"])
    batches = trained["recent"][-3:]
    single = []
    for b in batches:
        p = Pruner(model, PruningConfig(), mode="mean")
        model(b, labels=b).loss.backward()
        p.update_saliency()
        model.zero_grad(set_to_none=True)
        single.append((p.tracker.ffn_a[0].clone(), p.tracker.ffn_b[0].clone()))
        p.close()
    p = Pruner(model, PruningConfig(), mode="mean")
    for b in batches:
        model(b, labels=b).loss.backward()
        p.update_saliency()
        model.zero_grad(set_to_none=True)
    assert torch.allclose(p.tracker.ffn_a[0], sum(a for a, _ in single) / 3, rtol=1e-5, atol=1e-12)
    assert torch.allclose(p.tracker.ffn_b[0], sum(b for _, b in single) / 3, rtol=1e-5, atol=1e-12)
