"""effllm-train end to end: the CLI for real (subprocesses, torchrun with gloo), on tiny models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from effllm.model.params import count_parameters

TINY_TRAIN = ["--seq-len", "32", "--batch-size", "4", "--eval-windows", "4", "--eval-every", "5", "--log-every", "2",
              "--warmup-steps", "2", "--quiet"]  # fmt: skip


def run_cli(*args, cwd=None, launcher=None, timeout=600):
    cmd = (launcher or [sys.executable, "-m", "effllm.cli"]) + [str(a) for a in args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer, corpus):
    root = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))  # fmt: skip
    source.save_pretrained(root / "source")
    tokenizer.save_pretrained(root / "source")
    (root / "text.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for doc in corpus[:150]))
    return root


def _args(ws: Path, out: str, *extra):
    return ["--source", ws / "source", "--data", ws / "text.jsonl", "--out", ws / out, *TINY_TRAIN, *extra]


def test_prunes_to_target_and_writes_report(workspace):
    ws = workspace
    r = run_cli(*_args(ws, "run1", "--target-params", "0.6", "--tokens", "6400", "--prune-tokens", "3200"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = ws / "run1"
    result = json.loads((out / "results.json").read_text())
    log = [json.loads(line) for line in (out / "prune_log.jsonl").read_text().splitlines()]
    largest_group = max(rec["size"] for rec in log)
    assert result["target_params"] - largest_group < result["final_params"] <= result["target_params"]
    assert result["final_params"] == log[-1]["params_after"]
    assert {rec["type"] for rec in log} <= {"attention", "ffn", "stem"} and len(log) > 5
    for name in ("summary.md", "params_by_type.png", "architecture.png", "metrics.jsonl", "evals.jsonl"):
        assert (out / name).stat().st_size > 0, name
    assert "held-out perplexity: source" in r.stdout
    meta = json.loads((out / "data" / "meta.json").read_text())  # where effllm-eval/-export find the held-out split
    assert (out / "data" / "heldout.bin").stat().st_size == 2 * meta["heldout_tokens"] > 0
    # The result directory is a plain HF model directory at the pruned shapes.
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out / "model")
    assert count_parameters(config).total == result["final_params"]
    assert (out / "model" / "tokenizer.json").is_file()
    # The default granularity (32) leaves every width a multiple of the quantized formats' block.
    ffn = [width for _, _, width in config.layer_shapes()]
    assert config.hidden_size % 32 == 0 and all(width % 32 == 0 for width in ffn), (config.hidden_size, ffn)
    # A second invocation into the same directory is refused, and touches nothing.
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    again = run_cli(*_args(ws, "run1", "--target-params", "0.5", "--tokens", "6400"))
    assert again.returncode == 2 and "already holds another effllm run" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before


def test_kill_and_resume_is_bitwise_equal(workspace):
    ws = workspace
    common = ("--target-params", "0.55", "--tokens", "5120", "--prune-tokens", "3840", "--save-every", "3")
    full = run_cli(*_args(ws, "full", *common))
    assert full.returncode == 0, full.stderr[-3000:]
    # Preempted in the middle of the pruning phase (step 7 of 40; pruning runs to step 30).
    part = run_cli(*_args(ws, "part", *common, "--halt-at-step", "7"))
    assert part.returncode == 128 + 15, part.stderr[-3000:]
    assert "continue with --resume" in part.stdout
    state = json.loads((ws / "part" / "checkpoint" / "trainer.json").read_text())
    assert state["step"] == 7
    # as if killed between the two renames that swap a new checkpoint in: only checkpoint.old is there
    os.replace(ws / "part" / "checkpoint", ws / "part" / "checkpoint.old")
    resumed = run_cli("--out", ws / "part", "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(ws / "full" / "model" / "model.safetensors")
    b = load_file(ws / "part" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (ws / "full" / "prune_log.jsonl").read_text() == (ws / "part" / "prune_log.jsonl").read_text()


def test_torchrun_two_ranks_same_decisions_and_weights(workspace):
    ws = workspace
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
                "-m", "effllm.cli"]  # fmt: skip
    r = run_cli(*_args(ws, "ddp", "--target-params", "0.6", "--tokens", "5120", "--prune-tokens", "2560",
                       "--check-decisions"), launcher=launcher)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((ws / "ddp" / "results.json").read_text())
    assert result["world_size"] == 2
    # check_same_decisions / check_same_weights raise on any difference between ranks; these are the digests.
    assert len(result["decisions_digest"]) == 64 and len(result["weights_digest"]) == 64
    assert result["final_params"] <= result["target_params"]


@pytest.fixture()
def gpt2_dir(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_arch", "is a GPT2LMHeadModel; effllm imports only"),
        ("target_too_big", "is not smaller than the source"),
        ("below_floors", "below what the floors allow"),
        ("missing_data", "does not exist"),
        ("empty_data", ""),
        ("corrupt_checkpoint", "is corrupt"),
        ("foreign_out_dir", "files that are not an effllm run"),
    ],
)
def test_bad_input_exits_2_and_touches_nothing(case, message, workspace, tmp_path, gpt2_dir):
    ws = workspace
    out = tmp_path / "out"
    args = _args(ws, "unused", "--target-params", "0.5", "--tokens", "2560")
    args[args.index("--out") + 1] = out
    if case == "unknown_arch":
        args[1] = gpt2_dir
    elif case == "target_too_big":
        args[args.index("--target-params") + 1] = "10M"
    elif case == "below_floors":
        args += [
            "--min-ffn-per-layer",
            "128",
            "--min-heads-per-layer",
            "4",
            "--min-hidden-size",
            "64",
            "--target-params",
            "0.3",
        ]
    elif case == "missing_data":
        args[3] = tmp_path / "nope.txt"
    elif case == "empty_data":
        (tmp_path / "empty.txt").write_text("")
        args[3] = tmp_path / "empty.txt"
    elif case == "corrupt_checkpoint":
        ok = run_cli(*args, "--halt-at-step", "2", "--save-every", "100")
        assert ok.returncode == 143, ok.stderr[-2000:]
        (out / "checkpoint" / "state.safetensors").write_bytes(b"not a checkpoint")
        args = ["--out", out, "--resume"]
    elif case == "foreign_out_dir":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) if tmp_path.exists() else []
    r = run_cli(*args)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("effllm-train: error: "), r.stderr[-3000:]
    assert message in lines[0]
    assert "Traceback" not in r.stderr
    after = sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    assert after == before


def test_quickstart_embedded_default_tiny(tmp_path):
    """The no-argument path (builtin source pretraining on the embedded corpus), at toy size."""
    out = tmp_path / "qs"
    r = run_cli("--out", out, "--source-tokens", "8192", "--source-hidden", "64", "--source-layers", "2",
                "--source-heads", "4", "--source-kv-heads", "2", "--source-ffn", "128", "--source-vocab", "300",
                "--tokens", "8192", "--prune-tokens", "4096", *TINY_TRAIN)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    source = json.loads((out / "source" / "results.json").read_text())
    assert result["source_params"] == source["final_params"]
    assert result["final_params"] <= result["target_params"] == round(0.4 * result["source_params"])
    assert result["unigram_heldout_ppl"] > 1
    shutil.rmtree(out)


def _wait_for(pattern_root: Path, pattern: str, proc, timeout=300) -> bool:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if list(pattern_root.glob(pattern)):
            return True
        time.sleep(0.02)
    return False


def test_sigkill_while_tokenizing_and_after_a_checkpoint_then_resume(workspace, corpus, tmp_path):
    """A preempted cluster job: SIGKILL at any moment, then `--resume` continues (data included)."""
    import signal

    ws, out = workspace, tmp_path / "run"
    with (tmp_path / "big.jsonl").open("w") as f:  # ~2 MB: many shards of 20K characters
        for k in range(12):
            f.writelines(json.dumps({"text": f"{k} {doc}"}) + "\n" for doc in corpus[:300])
    args = ["--source", ws / "source", "--data", tmp_path / "big.jsonl", "--out", out, "--shard-chars", "20K",
            "--tokens", "12800", "--target-params", "0.6", "--prune-tokens", "6400", "--save-every", "5", *TINY_TRAIN]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "effllm.cli"]
    proc = subprocess.Popen(cmd + [str(a) for a in args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert _wait_for(out / "data", "tokens-*/00003.json", proc), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (out / "data" / "meta.json").exists() and not (out / "checkpoint").exists(), "killed while tokenizing"
    finished = {p: p.stat().st_mtime_ns for p in (out / "data").glob("tokens-*/train-0000[0-3].bin")}
    assert len(finished) == 4
    again = run_cli(*args)  # the same command without --resume is refused, and says what to do
    assert again.returncode == 2 and "pass --resume to continue it" in again.stderr, again.stderr[-2000:]

    proc = subprocess.Popen(cmd + ["--out", str(out), "--resume", "--quiet"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    assert _wait_for(out / "checkpoint", "trainer.json", proc), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGKILL)
    stdout, _ = proc.communicate()
    assert "no checkpoint" in stdout.decode() and (out / "data" / "meta.json").is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items()), "finished shards were reused"
    step = json.loads((out / "checkpoint" / "trainer.json").read_text())["step"]
    assert 5 <= step < 100

    done = run_cli("--out", out, "--resume", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["steps"] == 100 and result["final_params"] <= result["target_params"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "no step logged twice"


def test_one_text_file_just_works_and_tokenize_only(workspace, corpus, tmp_path):
    (tmp_path / "corpus.txt").write_text("\n\n".join(corpus[:150]))
    args = ["--source", workspace / "source", "--data", tmp_path / "corpus.txt", "--out", tmp_path / "run",
            "--tokens", "1280", *TINY_TRAIN]  # fmt: skip
    tok = run_cli(*args, "--tokenize-only")
    assert tok.returncode == 0, tok.stderr[-3000:]
    assert "one text file: holding out its last" in tok.stdout and (tmp_path / "run" / "data" / "meta.json").is_file()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["data"]
    r = run_cli(*[a for a in args if a != "--quiet"])  # the run then starts in the same --out and reuses the data
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reusing tokenized data" in r.stdout and (tmp_path / "run" / "results.json").is_file()


def test_every_pruning_knob_reaches_the_pruning_config_and_bad_values_are_train_errors():
    from dataclasses import fields

    from effllm.pruning import PruningConfig
    from effllm.training.plan import pruning_config
    from effllm.training.recipe import TrainConfig
    from effllm.training.train import TrainError

    knobs = dict(granularity=8, ema_beta=0.9, min_heads_per_layer=2, min_ffn_per_layer=16, min_hidden_size=64,
                 weight_update="obs", obs_damping=0.05, fisher="group", stem_price=0.5)  # fmt: skip
    built = pruning_config(TrainConfig(**knobs))
    assert {k: getattr(built, k) for k in knobs} == knobs
    # the one PruningConfig field training does not take: the one-shot baseline's score order
    assert {f.name for f in fields(PruningConfig)} - {f.name for f in fields(TrainConfig)} == {"taylor_order"}
    with pytest.raises(TrainError, match="stem_price must be > 0"):
        pruning_config(TrainConfig(stem_price=0))


def test_bad_pruning_knob_stops_the_quickstart_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "effllm.cli", "--stem-price", "0", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["effllm-train: error: stem_price must be > 0 (got 0.0); 1 prices hidden channels as measured"]
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--world-size", "two", "--dry-run"], "argument --world-size: invalid int value: 'two'"),
    ],
)
def test_usage_error_is_one_line_and_exit_2(argv, message, capsys):
    """argparse's own errors in the style of every effllm command (effllm.common.cli_args.CliParser)."""
    from effllm.cli import train_main

    with pytest.raises(SystemExit) as exit_:
        train_main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"effllm-train: error: {message}; see effllm-train --help"]
