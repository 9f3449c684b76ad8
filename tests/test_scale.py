"""Recipes, the --dry-run plan, and the parts of effllm-train that matter at cluster scale."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from effllm.cli import parser
from effllm.model.known_sources import known_config, known_names, lookup
from effllm.model.params import count_parameters
from effllm.training.dry_run import activation_bytes_per_token_layer, format_plan, make_plan, memory
from effllm.training.recipe import RecipeError, TrainConfig, build_config, load_recipe, recipe_names


@pytest.mark.parametrize("name", recipe_names())
def test_every_shipped_recipe_loads_into_a_train_config(name):
    assert load_recipe(name)  # a name with dots (smollm-1.7b-to-469m) is a recipe name, not a file suffix
    cfg = build_config(name, parser().parse_args([]))
    assert isinstance(cfg, TrainConfig)
    assert cfg.tokens > 0 and cfg.seq_len > 0 and cfg.batch_size > 0
    if cfg.target_params is not None:
        from effllm.model.params import parse_count

        value = float(cfg.target_params) if cfg.target_params.replace(".", "").isdigit() else None
        assert (0 < value < 1) if value is not None else parse_count(cfg.target_params) > 0


def test_recipe_names_and_paths(tmp_path):
    assert "smollm-1.7b-to-469m" in recipe_names() and "quickstart" in recipe_names()
    path = tmp_path / "mine.v2.yaml"
    path.write_text("tokens: 1M\nseq_len: 64\n")
    assert build_config(str(path), parser().parse_args([])).tokens == 1_000_000
    with pytest.raises(RecipeError, match="no recipe 'smollm-9b'"):
        load_recipe("smollm-9b")
    path.write_text("tokenz: 5\n")
    with pytest.raises(RecipeError, match="unknown keys"):
        load_recipe(str(path))
    path.write_text("dtype: bfloat16\n")  # argparse never sees a recipe's values: the config checks its choices
    with pytest.raises(RecipeError, match=r"dtype 'bfloat16' is not one of \['auto', 'fp32', 'bf16'\]"):
        build_config(str(path), parser().parse_args([]))


def test_known_sources_match_their_public_sizes():
    sizes = {"HuggingFaceTB/SmolLM-135M": 134.5e6, "HuggingFaceTB/SmolLM-360M": 361.8e6,
             "HuggingFaceTB/SmolLM-1.7B": 1.711e9, "Qwen/Qwen2.5-0.5B": 494.0e6, "Qwen/Qwen2.5-1.5B": 1.544e9,
             "meta-llama/Llama-3.2-1B": 1.236e9, "meta-llama/Llama-3.2-3B": 3.213e9}  # fmt: skip
    assert set(sizes) <= set(known_names())
    for name, size in sizes.items():
        assert count_parameters(known_config(name)).total == pytest.approx(size, rel=2e-3), name
    assert lookup("smollm-1.7b") == "HuggingFaceTB/SmolLM-1.7B" and lookup("nobody/unknown-7b") is None


def test_memory_formulas():
    cfg = TrainConfig(source="HuggingFaceTB/SmolLM-135M", batch_size=2, seq_len=128)
    config = known_config(cfg.source)
    p = count_parameters(config).total
    ddp = memory(config, cfg, world_size=4, fsdp=False)
    assert (ddp.weights, ddp.gradients, ddp.adamw, ddp.ddp_buckets) == (4 * p, 4 * p, 8 * p, 4 * p)
    a = activation_bytes_per_token_layer(576, 9 * 64, 3 * 64, 1536)
    assert a == 12 * 576 + 6 * 576 + 6 * 192 + 8 * 1536
    assert ddp.activations == 30 * a * 256 and ddp.logits == 10 * 49152 * 256
    fsdp = memory(config, cfg, world_size=4, fsdp=True)
    assert fsdp.weights == 4 * -(-p // 4) and fsdp.ddp_buckets == 0 and fsdp.fsdp_working_set > 0
    ckpt = memory(config, TrainConfig(source=cfg.source, batch_size=2, seq_len=128, gradient_checkpointing=True), 4, False)
    assert ckpt.activations == (4 * 576 * 30 + a) * 256 < ddp.activations


def test_plan_of_the_paper_recipe():
    cfg = build_config("smollm-1.7b-to-469m", parser().parse_args([]))
    plan = make_plan(cfg, world_size=8, tokens_per_s=400_000)
    assert plan.source_params == count_parameters(known_config("HuggingFaceTB/SmolLM-1.7B")).total
    assert plan.target_params == 469_000_000 and plan.tokens_per_step == 4 * 2048 * 64 * 8
    assert plan.budget_points[0] == (0, plan.source_params) and plan.budget_points[-1] == (30e9, 469_000_000)
    budgets = [b for _, b in plan.budget_points]
    assert budgets == sorted(budgets, reverse=True)
    # a constant 400K tokens/s would take 50B / 400K s; the model shrinks, so it takes less
    assert 0.4 * 50e9 / 400_000 < plan.seconds < 50e9 / 400_000
    assert plan.ddp.total < 80 * 2**30, "the shipped recipe fits an 80 GiB GPU with DDP"
    text = format_plan(plan)
    assert "FSDP2" in text and "469.00M" in text and "prune steps" in text


def test_dry_run_cli_is_offline_and_writes_nothing(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "effllm.cli", "--recipe", "smollm-1.7b-to-469m", "--dry-run", "--world-size", "8",
           "--out", str(tmp_path / "run")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "HuggingFaceTB/SmolLM-1.7B" in r.stdout and "fits: DDP yes" in r.stdout and "time:" in r.stdout
    assert not (tmp_path / "run").exists()
    bad = subprocess.run([*cmd, "--target-params", "5B"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("effllm-train: error:")
    assert "not smaller than the source" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_dry_run_unknown_source_offline_is_one_line(tmp_path):
    args = argparse.Namespace()
    del args
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "effllm.cli", "--source", "nobody/no-such-model", "--target-params", "0.5",
           "--dry-run"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]


def test_gpu_check_runs_at_toy_size_on_cpu(tmp_path):
    """bench/gpu_check.py --toy: pruning-aware training (compile off and on), then ONNX export parity."""
    bench = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_check.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, bench, "--toy", "--out", str(out)], capture_output=True, text=True, env=env,
                       timeout=900)  # fmt: skip
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    import json

    result = json.loads(out.read_text())
    assert result["size"] == "toy" and [run["compile"] for run in result["runs"]] == [False, True]
    for run in result["runs"]:
        assert run["final_params"] <= run["source_params"] // 2 + 1 and run["tokens_per_s_after"] > 0
    assert result["export"]["exit_code"] == 0 and result["export"]["verify"] is not None
    assert out.with_suffix(".md").read_text().startswith("# GPU check")


def test_plan_with_a_measured_throughput():
    cfg = TrainConfig(source_hidden=32, source_layers=2, source_heads=2, source_kv_heads=1, source_ffn=64,
                      source_vocab=300, seq_len=32, batch_size=2, tokens=64_000, target_params="0.5")  # fmt: skip
    plan = make_plan(cfg, world_size=2, measure_steps=2)
    assert plan.throughput_from.startswith("measured") and any("tokens/s on one device (cpu" in n for n in plan.notes)
    rate = float(next(n for n in plan.notes if n.startswith("measured")).split()[1].replace(",", ""))
    # time = tokens / (2 devices x the measured rate), less as the model shrinks (never more), after
    # pretraining the embedded source at the source's rate
    pretrain = cfg.source_tokens / (2 * rate)
    assert any("pretraining the embedded source" in n for n in plan.notes)
    assert 0.3 * 64_000 / (2 * rate) < plan.seconds - pretrain <= 1.01 * 64_000 / (2 * rate)
