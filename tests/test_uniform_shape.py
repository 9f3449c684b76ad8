"""--shape uniform: every layer keeps one shape, and the result is a stock Llama/Qwen2 checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import IRREGULAR, tiny_config, tiny_model
from test_train import _args, run_cli, workspace  # noqa: F401  (workspace: a fixture)

from effllm.pruning import GroupType, ModelShapes, Pruner, PruningConfig, select_groups
from effllm.pruning.groups import floor_shapes

UNIFORM = PruningConfig(shape="uniform", granularity=1)  # single channels: the toy widths are few blocks of 32


def _random_scores(shapes: ModelShapes, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "attention": [rng.random(k) for k in shapes.kv_heads],
        "ffn": [rng.random(f) for f in shapes.ffn],
        "stem": rng.random(shapes.hidden),
        "ffn_extra": np.zeros(shapes.num_layers),
    }


def test_uniform_selection_takes_each_layers_least_salient_groups_and_keeps_one_shape():
    shapes = ModelShapes.from_config(tiny_config(num_attention_heads=8, num_key_value_heads=4))
    scores = _random_scores(shapes)
    budget = int(shapes.total() * 0.6)
    selection = select_groups(shapes, scores, budget, UNIFORM)
    assert selection.params_after <= budget and not selection.floor_hit
    after = shapes.copy()
    removed = {(kind, i): [] for kind in (GroupType.ATTENTION, GroupType.FFN) for i in range(shapes.num_layers)}
    for c in selection.choices:
        after.remove(c.type, c.layer, len(c.positions))
        if c.type != GroupType.STEM:
            removed[(c.type, c.layer)].extend(c.positions)
    assert len(set(after.layer_shapes())) == 1 and after.ffn[0] < shapes.ffn[0]
    # Per layer by rank: each layer lost exactly its own least salient units, however many.
    for (kind, i), positions in removed.items():
        layer_scores = scores[kind.value][i]
        assert sorted(positions) == sorted(np.argsort(layer_scores, kind="stable")[: len(positions)].tolist())
    # The irregular selection on the same scores does not keep one shape: the test can tell them apart.
    irregular = shapes.copy()
    for c in select_groups(shapes, scores, budget, PruningConfig()).choices:
        irregular.remove(c.type, c.layer, len(c.positions))
    assert len(set(irregular.layer_shapes())) > 1


def test_uniform_floors_keep_a_kv_group_and_a_granule_in_every_layer():
    config = tiny_config(num_attention_heads=8, num_key_value_heads=4)
    shapes = ModelShapes.from_config(config)
    cfg = PruningConfig(shape="uniform", granularity=8)
    selection = select_groups(shapes, _random_scores(shapes, 1), 0, cfg)
    floor = shapes.copy()
    for c in selection.choices:
        floor.remove(c.type, c.layer, len(c.positions))
    assert selection.floor_hit
    assert set(floor.layer_shapes()) == {(2, 1, 8)}  # one KV group (2 query heads), one granule of 8
    assert floor.total() == floor_shapes(shapes, cfg).total()
    model = tiny_model(num_attention_heads=8, num_key_value_heads=4)
    pruner = Pruner(model, cfg)
    assert pruner.min_params() == floor.total()
    pruner.close()
    with pytest.raises(ValueError, match="shape 'uniform' needs"):
        irregular = ModelShapes.from_config(tiny_config(**IRREGULAR))
        select_groups(irregular, _random_scores(irregular), 0, UNIFORM)


@pytest.mark.parametrize(
    ("arch", "shape"),
    [
        ("Llama", dict(hidden_size=48)),  # head_dim 16, not 48 / 4: explicit in the config
        ("Qwen2", dict(attention_bias=True, hidden_size=45, tie_word_embeddings=False)),
        ("Llama", dict(attention_bias=True, mlp_bias=True)),  # Llama's o_proj bias: zero
        ("Mistral", dict(hidden_size=45)),  # LlamaConfig refuses 45 hidden for 4 heads
    ],
)
def test_plain_checkpoint_computes_what_effllm_computes(tmp_path, arch, shape):
    from transformers import AutoModelForCausalLM

    from effllm.model.plain import to_plain

    model = tiny_model(**shape)
    to_plain(model).save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False, dtype=torch.float32)
    assert type(plain).__name__ == f"{arch}ForCausalLM"
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_train_shape_uniform_saves_a_plain_llama_that_stock_transformers_runs(workspace):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from effllm.model.modeling_effllm import EfficientLLMForCausalLM

    r = run_cli(*_args(workspace, "uniform", "--shape", "uniform", "--target-params", "0.6", "--tokens", "1600"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = workspace / "uniform"
    result = json.loads((out / "results.json").read_text())
    assert len({tuple(s) for s in result["layer_shapes"]}) == 1
    assert 0 < result["final_params"] <= result["target_params"]
    config = json.loads((out / "model-plain" / "config.json").read_text())
    assert config["model_type"] in ("llama", "mistral") and "auto_map" not in config
    assert not list((out / "model-plain").glob("*.py"))  # nothing to trust: stock classes only
    plain = AutoModelForCausalLM.from_pretrained(out / "model-plain", trust_remote_code=False, dtype=torch.float32)
    ours = EfficientLLMForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    ids = torch.randint(0, config["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


def test_shape_uniform_refuses_an_irregular_source(workspace):  # noqa: F811
    source = workspace / "irregular-source"
    model = tiny_model(
        **IRREGULAR, vocab_size=json.loads((workspace / "source" / "config.json").read_text())["vocab_size"]
    )
    model.save_pretrained(source)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).write_bytes((workspace / "source" / name).read_bytes())
    r = run_cli("--source", source, *_args(workspace, "uniform-bad", "--shape", "uniform", "--target-params", "0.6",
                                           "--tokens", "800")[2:])  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--shape uniform" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (workspace / "uniform-bad" / "model").exists()
