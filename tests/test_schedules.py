"""effllm-train --schedule one-shot | staged, end to end on the tiny source of test_train."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import TINY_TRAIN, _args, _wait_for, run_cli, workspace  # noqa: F401  (workspace: a fixture)

# 128 tokens per step: 25 steps; the one-shot removal comes after step 5 (token 640)
# Single channels in the schedule tests: the toy source's widths (64 hidden, 128 FFN) are a few blocks of 32.
ONE_SHOT = ("--schedule", "one-shot", "--target-params", "0.55", "--tokens", "3200", "--prune-start", "640",
            "--calibration-batches", "12", "--save-every", "2", "--granularity", "1")  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    """Bitwise equal weights and the same prune log."""
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert (a / "prune_log.jsonl").read_text() == (b / "prune_log.jsonl").read_text()


def kill_then_resume(args: list, out: Path, halt_at: int) -> None:
    """SIGKILL once the first checkpoint is there, then --resume twice: stopped again (SIGTERM, a
    checkpoint) right after step ``halt_at``, then to the end."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "effllm.cli", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    assert _wait_for(out / "checkpoint", "trainer.json", proc), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    step = json.loads((out / "checkpoint" / "trainer.json").read_text())["step"]
    if step < halt_at:
        halted = run_cli("--out", out, "--resume", "--quiet", "--halt-at-step", halt_at)
        assert halted.returncode == 128 + 15, halted.stderr[-3000:]
        assert json.loads((out / "checkpoint" / "trainer.json").read_text())["step"] == halt_at
    done = run_cli("--out", out, "--resume", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def one_shot_run(workspace):  # noqa: F811
    r = run_cli(*_args(workspace, "one-shot", *ONE_SHOT))
    assert r.returncode == 0, r.stderr[-3000:]
    return workspace / "one-shot"


def test_one_shot_lands_on_the_target_once_and_the_architecture_stays(one_shot_run):
    out = one_shot_run
    result = json.loads((out / "results.json").read_text())
    log = read_jsonl(out / "prune_log.jsonl")
    assert len(log) > 5 and {(r["step"], r["tokens"], r["stage"]) for r in log} == {(5, 640, 1)}
    smallest_group = 3 * result["hidden_size"]  # one FFN channel: gate, up and down
    assert 0 <= result["target_params"] - result["final_params"] <= smallest_group
    assert result["final_params"] == log[-1]["params_after"]
    metrics = read_jsonl(out / "metrics.jsonl")
    assert {m["params"] for m in metrics if m["step"] <= 5} == {result["source_params"]}
    after = [m for m in metrics if m["step"] > 5]
    assert len(after) >= 8 and {m["params"] for m in after} == {result["final_params"]}
    assert {m["ffn_width"] for m in after} == {after[-1]["ffn_width"]}
    assert {m["phase"] for m in metrics} == {"train"}


def test_staged_removes_in_k_steps_along_the_budget(workspace):  # noqa: F811
    from effllm.pruning import ParameterBudget

    args = ("--schedule", "staged", "--stages", "3", "--target-params", "0.5", "--tokens", "3200",
            "--prune-tokens", "1920", "--calibration-batches", "4", "--granularity", "1")  # fmt: skip
    r = run_cli(*_args(workspace, "staged", *args))
    assert r.returncode == 0, r.stderr[-3000:]
    out = workspace / "staged"
    result = json.loads((out / "results.json").read_text())
    log = read_jsonl(out / "prune_log.jsonl")
    assert sorted({(rec["step"], rec["stage"]) for rec in log}) == [(0, 1), (5, 2), (10, 3)]
    stages = ParameterBudget(result["source_params"], result["target_params"], 0, 1920).stages(3)
    after = [[rec for rec in log if rec["stage"] == k][-1]["params_after"] for k in (1, 2, 3)]
    assert after[0] > after[1] > after[2] == result["final_params"]
    for (_, budget), params in zip(stages, after):
        assert params <= budget
    assert 0 <= result["target_params"] - result["final_params"] <= 3 * result["hidden_size"]


def test_one_shot_sigkill_then_resume_is_bitwise_equal(workspace, one_shot_run):  # noqa: F811
    out = workspace / "one-shot-killed"
    kill_then_resume(_args(workspace, "one-shot-killed", *ONE_SHOT), out, halt_at=5)
    assert_same_run(one_shot_run, out)
    steps = [m["step"] for m in read_jsonl(out / "metrics.jsonl")]
    assert steps == sorted(set(steps))


def test_dry_run_names_the_schedule(workspace, capsys):  # noqa: F811
    from effllm.cli import train_main

    base = ["--source", str(workspace / "source"), "--target-params", "0.5", "--tokens", "3200", "--dry-run"]
    assert train_main(base + ["--schedule", "staged", "--stages", "3", "--prune-tokens", "1920"]) == 0
    staged = capsys.readouterr().out
    assert "schedule: staged, 3 removal(s), each after a calibration pass of 16 micro-batches" in staged
    assert " at 0 tokens, " in staged and " at 640 tokens, " in staged and " at 1,280 tokens" in staged
    assert train_main(base) == 0
    assert "schedule: continuous" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--schedule", "one-shot", "--calibration-batches", "0"], "--calibration-batches must be at least 1"),
        (["--schedule", "one-shot", "--prune-start", "1280"], "--prune-start 1,280 leaves no training after"),
        (["--schedule", "staged", "--stages", "0", "--target-params", "0.5"], "--stages must be at least 1"),
    ],
)
def test_bad_schedule_flags_exit_2_with_one_line(workspace, tmp_path, extra, message):  # noqa: F811
    r = run_cli("--source", workspace / "source", "--data", workspace / "text.jsonl", "--out", tmp_path / "x",
                "--tokens", "1280", *TINY_TRAIN, *extra)  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"effllm-train: error: {message}"), r.stderr[-2000:]
    assert not (tmp_path / "x").exists()
