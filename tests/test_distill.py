"""effllm-train --distill: the KD loss against torch's kl_div, the frozen teacher, resume, DDP, bad teachers."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from test_schedules import assert_same_run, kill_then_resume
from test_train import _args, run_cli, workspace  # noqa: F401  (workspace: a fixture)

from effllm.training.distill import Distiller, kd_loss, load_teacher, training_loss
from effllm.training.recipe import TrainConfig

DISTILL = ("--distill", "--distill-temperature", "2", "--distill-weight", "0.7", "--target-params", "0.6",
           "--tokens", "2560", "--prune-tokens", "1280", "--save-every", "3")  # fmt: skip


def reference_kd(student, teacher, temperature):
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature**2


@pytest.mark.parametrize("temperature, chunk", [(1.0, None), (2.5, 7), (0.5, 1)])
def test_kd_loss_equals_kl_div_in_value_and_gradient(temperature, chunk):
    torch.manual_seed(0)
    student = (3 * torch.randn(45, 97, dtype=torch.float64)).requires_grad_()
    teacher = 3 * torch.randn(45, 97, dtype=torch.float64)
    ours = kd_loss(student, teacher, temperature, chunk=chunk)
    ref = reference_kd(student, teacher, temperature)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    weights = torch.randn(())  # a non-unit upstream gradient
    (g_ours,) = torch.autograd.grad(ours * weights, student)
    (g_ref,) = torch.autograd.grad(ref * weights, student)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-12)
    assert ours.item() > 0


def test_training_loss_mixes_kd_and_lm_as_documented():
    from conftest import tiny_model

    student, teacher = tiny_model(0), tiny_model(1)
    ids = torch.randint(0, 512, (2, 17))
    distill = Distiller(teacher.requires_grad_(False), temperature=1.5, weight=0.3)
    loss = training_loss(student, ids, _no_autocast, distill)
    logits = student(ids[:, :-1]).logits.flatten(0, 1)
    with torch.no_grad():
        target = teacher(ids[:, :-1]).logits.flatten(0, 1)
    expected = 0.3 * reference_kd(logits, target, 1.5) + 0.7 * F.cross_entropy(logits, ids[:, 1:].flatten())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss, F.cross_entropy(logits, ids[:, 1:].flatten()))


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()


def test_teacher_is_frozen_and_unchanged_by_training(workspace):  # noqa: F811
    from effllm.model.convert import from_pretrained
    from effllm.training.train import build_optimizer

    cfg = TrainConfig(source=str(workspace / "source"), distill=True, distill_weight=0.5)
    student, tokenizer = from_pretrained(cfg.source)
    distill = load_teacher(cfg, tokenizer, student.config.vocab_size, torch.device("cpu"))
    teacher = distill.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    optimizer = build_optimizer(student.train(), TrainConfig(lr=1e-2))
    torch.manual_seed(0)
    for _ in range(3):
        loss = training_loss(student, torch.randint(0, student.config.vocab_size, (2, 33)), _no_autocast, distill)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not teacher_ids & {id(p) for p in optimizer.state}


def test_distill_sigkill_then_resume_is_bitwise_equal(workspace):  # noqa: F811
    full = run_cli(*_args(workspace, "distill-full", *DISTILL))
    assert full.returncode == 0, full.stderr[-3000:]
    assert "distilling from" in full.stdout
    out = workspace / "distill-killed"
    kill_then_resume(_args(workspace, "distill-killed", *DISTILL), out, halt_at=7)
    assert_same_run(workspace / "distill-full", out)
    # and distillation changed the run: a plain run of the same settings ends elsewhere
    plain = run_cli(*_args(workspace, "distill-plain", *[a for a in DISTILL if a != "--distill"]))
    assert plain.returncode == 0, plain.stderr[-3000:]
    a = json.loads((workspace / "distill-full" / "results.json").read_text())["final_heldout_ppl"]
    b = json.loads((workspace / "distill-plain" / "results.json").read_text())["final_heldout_ppl"]
    assert a != b


def _prune_log(path) -> list[dict]:
    return [json.loads(line) for line in (path / "prune_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("schedule", ["continuous", "one-shot"])
def test_distill_ranks_groups_by_the_models_own_loss(workspace, schedule):  # noqa: F811
    """The KD gradient is zero while the student equals its teacher (the source), so a saliency taken from it
    ranks nothing (SmolLM2-135M lost 90% of its attention that way). The first removal with --distill must
    be the one without it: the same groups, the same nonzero saliency."""
    common = ("--target-params", "0.6", "--tokens", "2560", "--prune-tokens", "1280", "--schedule", schedule,
              "--calibration-batches", "2")  # fmt: skip
    logs = {}
    for name, extra in (("plain", ()), ("kd", ("--distill",))):
        r = run_cli(*_args(workspace, f"rank-{schedule}-{name}", *common, *extra))
        assert r.returncode == 0, r.stderr[-3000:]
        log = _prune_log(workspace / f"rank-{schedule}-{name}")
        logs[name] = [
            (rec["type"], rec["layer"], rec["index"], rec["saliency"]) for rec in log if rec["step"] == log[0]["step"]
        ]
    assert logs["kd"] == logs["plain"] and any(saliency > 0 for *_, saliency in logs["kd"])


def test_torchrun_two_ranks_agree_with_distill_and_a_staged_schedule(workspace):  # noqa: F811
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29541",
                "-m", "effllm.cli"]  # fmt: skip
    r = run_cli(*_args(workspace, "distill-ddp", "--distill", "--schedule", "staged", "--stages", "2",
                       "--calibration-batches", "3", "--target-params", "0.6", "--tokens", "5120",
                       "--prune-tokens", "2560", "--check-decisions", "--granularity", "1"), launcher=launcher)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((workspace / "distill-ddp" / "results.json").read_text())
    # check_same_decisions / check_same_weights raise on any difference between the ranks
    assert result["world_size"] == 2 and len(result["decisions_digest"]) == len(result["weights_digest"]) == 64
    log = [json.loads(line) for line in (workspace / "distill-ddp" / "prune_log.jsonl").read_text().splitlines()]
    assert sorted({rec["stage"] for rec in log}) == [1, 2]
    assert 0 <= result["target_params"] - result["final_params"] <= 3 * result["hidden_size"]


def test_teacher_with_another_vocabulary_is_one_line_and_exit_2(workspace, tmp_path, tokenizer):  # noqa: F811
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=600, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=64)).save_pretrained(tmp_path / "t")  # fmt: skip
    tokenizer.save_pretrained(tmp_path / "t")
    r = run_cli(*_args(workspace, "unused", "--distill", "--teacher", tmp_path / "t", "--tokens", "1280"))
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith(f"effllm-train: error: --teacher {tmp_path / 't'} has another vocabulary (600 tokens")
    assert "use a teacher with the source's tokenizer" in lines[0]
    assert not (workspace / "unused").exists()
    alone = run_cli(*_args(workspace, "unused", "--teacher", tmp_path / "t", "--tokens", "1280"))
    assert alone.returncode == 2 and "is used only with --distill" in alone.stderr


def test_dry_run_counts_the_teacher(workspace):  # noqa: F811
    from effllm.model.params import count_parameters
    from effllm.training.distill import CHUNK_ELEMENTS
    from effllm.training.dry_run import make_plan, source_config

    cfg = TrainConfig(source=str(workspace / "source"), target_params="0.5")
    plain, distilled = make_plan(cfg), make_plan(TrainConfig(**{**cfg.__dict__, "distill": True}))
    config = source_config(cfg)[0]
    tokens = cfg.batch_size * cfg.seq_len
    expected = 4 * count_parameters(config).total + 4 * config.vocab_size * tokens + 12 * CHUNK_ELEMENTS
    assert plain.ddp.teacher == 0 and distilled.ddp.teacher == expected == distilled.fsdp.teacher
    assert distilled.ddp.total - plain.ddp.total == expected
