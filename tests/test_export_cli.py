"""effllm-export: a real export of a trained irregular model, the verification it writes, and bad input."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import tiny_model
from effllm.export.cli import main
from effllm.export.verify import (
    MAX_REL_LOGIT_DIFF,
    QUANTIZED_THRESHOLDS,
    TorchReference,
    VariantReport,
    verify_variant,
)
from export_helpers import SHAPES, cli_export_of_trained_model, random_model_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


VARIANT_FILES = {
    "onnx": ["model.onnx", "genai_config.json", "tokenizer.json", "tokenizer_config.json"],
    "onnx-int8": ["model.onnx", "genai_config.json", "tokenizer.json"],
    "onnx-int4": ["model.onnx", "genai_config.json", "tokenizer.json"],
    "executorch": ["model.pte", "tokenizer.json"],
    "executorch-8da4w": ["model.pte", "tokenizer.json"],
    "gguf": ["model.gguf", "tokenizer.json"],
    "gguf-q8_0": ["model.gguf", "tokenizer.json"],
    "gguf-q4_0": ["model.gguf", "tokenizer.json"],
    "gguf-q4_k_m": ["model.gguf", "tokenizer.json"],
}


def test_cli_exports_and_verifies_the_trained_irregular_model(tokenizer, corpus):
    run = cli_export_of_trained_model(tokenizer, corpus)
    assert run.code == 0, run.stderr[-3000:]
    for variant, files in VARIANT_FILES.items():
        for name in files:
            assert (run.out / variant / name).is_file(), (variant, name)
    assert not [p for p in run.out.iterdir() if p.name.startswith(".")]  # no staging left behind

    report = json.loads((run.out / "verify.json").read_text())
    assert report["passed"] is True
    assert report["eval_text"].endswith("run/data/heldout.bin")  # effllm-train's split, found beside the model
    assert report["eval_windows"] >= 4
    variants = {v["name"]: v for v in report["variants"]}
    assert set(variants) == set(VARIANT_FILES)
    for name, v in variants.items():
        assert v["passed"] and not v["failures"], name
        assert v["size_bytes"] > 0 and v["export_seconds"] > 0
        if v["quantization"] in MAX_REL_LOGIT_DIFF:  # fp32, and the gguf variant's f16 weights
            assert v["max_abs_logit_diff"] <= MAX_REL_LOGIT_DIFF[v["quantization"]] * v["logit_scale"]
            assert v["greedy_equal_prompts"] == v["prompts"] >= 3
            assert all(c["greedy_equal"] for c in v["prompt_checks"])
            assert math.isclose(v["ppl"], v["ppl_torch"], rel_tol=1e-4 if v["quantization"] == "fp32" else 1e-2)
        else:
            limits = QUANTIZED_THRESHOLDS[v["quantization"]]
            assert limits["min_top1_agreement"] <= v["top1_agreement"] < 1.0
            assert v["ppl_increase"] <= limits["max_ppl_increase"]
            assert v["size_bytes"] < variants[v["format"]]["size_bytes"]
    assert variants["onnx"]["genai_greedy_equal_prompts"] == variants["onnx"]["prompts"]
    # The table is printed (stdout) and kept for people (verify.md); progress went to stderr.
    for name in VARIANT_FILES:
        assert f"| {name} |" in run.stdout
        assert f"| {name} |" in (run.out / "verify.md").read_text()
    assert "[18/18] verify gguf-q4_k_m" in run.stderr


@pytest.fixture(scope="module")
def small_model_dir(tokenizer):
    return random_model_dir("uniform", tokenizer)[1]


def _bad_input(argv, capsys):
    capsys.readouterr()  # drop what setting up the test printed (save_pretrained's progress bar)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("effllm-export: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_not_a_model_directory(tmp_path, capsys):
    line = _bad_input([tmp_path / "missing", "--out", tmp_path / "out"], capsys)
    assert "is not a model directory (no config.json)" in line and "effllm-train" in line
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64)
    ).save_pretrained(tmp_path / "llama")
    line = _bad_input([tmp_path / "llama", "--out", tmp_path / "out"], capsys)
    assert "LlamaForCausalLM" in line and "model_type 'effllm'" in line and "convert" in line


def test_max_seq_len_beyond_the_model(small_model_dir, tmp_path, capsys):
    line = _bad_input([small_model_dir, "--out", tmp_path / "out", "--max-seq-len", 4096], capsys)
    assert "--max-seq-len 4096 is beyond what the model supports (max_position_embeddings 256)" in line
    assert "--max-seq-len 256 or less" in line


def test_unwritable_out_dir(small_model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    line = _bad_input([small_model_dir, "--out", blocker / "export"], capsys)
    assert "cannot write to output directory" in line and "choose a writable --out" in line


def test_missing_tokenizer_and_inapplicable_quantization(small_model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(small_model_dir, bare)
    (bare / "tokenizer.json").unlink()
    assert "has no tokenizer.json" in _bad_input([bare, "--out", tmp_path / "out"], capsys)
    line = _bad_input([small_model_dir, "--format", "onnx", "--quantize", "8da4w", "--out", tmp_path / "o"], capsys)
    assert "--quantize 8da4w applies to executorch" in line


def test_no_arguments_without_a_quickstart_model_asks_for_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = _bad_input([], capsys)
    assert "runs/quickstart/model" in line and "effllm-train" in line
    assert not (tmp_path / "runs").exists()


def test_help_explains_every_flag():
    assert shutil.which("effllm-export"), "console script not installed: pip install -e ."
    out = subprocess.run(["effllm-export", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in (
        "MODEL_DIR",
        "--format",
        "--out",
        "--quantize",
        "--group-size",
        "--max-seq-len",
        "--eval-text",
        "--no-verify",
    ):
        assert flag in out.stdout, flag
    assert "runs/quickstart/model" in out.stdout and "Exit codes" in out.stdout


def test_the_export_keeps_library_chatter_out_of_the_terminal(small_model_dir, tmp_path):
    """torch.onnx logs "torchvision is not installed. Skipping torchvision::nms" (and more) to the process's
    stderr through its own handler; effllm-export quiets those loggers while it exports."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = [str(small_model_dir), "--format", "onnx", "--no-verify", "--max-seq-len", "64", "--out", str(tmp_path)]
    out = subprocess.run(["effllm-export", *argv], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "onnx" / "model.onnx").is_file()
    assert "torchvision" not in out.stderr and "Skipping" not in out.stderr, out.stderr
    assert not re.search(r"^[DIWE]\d{4} ", out.stderr, re.M), out.stderr  # torch's log line format
    assert "Loading weights" not in out.stderr  # transformers' progress bar
    assert out.stderr.startswith("effllm-export: ") and out.stderr.rstrip().endswith("(verification skipped: --no-verify)")


def test_library_loggers_are_quiet_only_inside_the_block():
    """Not process-wide: the loggers' own levels come back when the export ends."""
    from effllm.export.pipeline import quiet_loggers

    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    before = [logging.getLogger(name).level for name in ("torch", "torchao", "onnxscript")]
    with quiet_loggers():
        assert not registration.isEnabledFor(logging.WARNING)
        assert registration.isEnabledFor(logging.ERROR)
    assert [logging.getLogger(name).level for name in ("torch", "torchao", "onnxscript")] == before
    assert registration.isEnabledFor(logging.WARNING)


def test_a_failed_export_leaves_the_output_as_it_was(small_model_dir, tmp_path, monkeypatch, capsys):
    """A crash mid-export (here: the ONNX exporter, after writing part of a file) publishes nothing."""
    import effllm.export.onnx_export as onnx_export

    out = tmp_path / "out"
    (out / "onnx").mkdir(parents=True)
    (out / "onnx" / "model.onnx").write_text("the previous, good export")

    def crash(model, out_dir, *args, **kwargs):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "model.onnx").write_text("half")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(onnx_export, "export_onnx", crash)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        main([str(small_model_dir), "--format", "onnx", "--out", str(out), "--no-verify"])
    assert sorted(p.name for p in out.iterdir()) == ["onnx"]
    assert (out / "onnx" / "model.onnx").read_text() == "the previous, good export"


class _Drifting:
    """An exported model whose logits are torch's plus a fixed offset on one token (a broken export)."""

    def __init__(self, reference, offset):
        self.reference, self.offset = reference, offset
        self.ids: list[int] = []

    def forward_all(self, tokens, start_pos):
        self.ids = self.ids[:start_pos] + list(tokens)
        logits = self.reference.logits(self.ids)[start_pos:].copy()
        logits[:, 7] += self.offset
        return logits


@pytest.mark.parametrize("offset, fails", [(0.0, False), (3e-4, True), (1e3, True)])
def test_verification_thresholds_fail_a_drifting_model(offset, fails):
    """The thresholds can fail: small drift breaks fp32 parity, large drift also breaks quantized checks."""
    reference = TorchReference(tiny_model(**SHAPES["irregular"]))
    prompts = {"a": [5, 9, 30, 2], "b": [100, 3]}
    windows = [[int(t) for t in np.random.default_rng(0).integers(1, 512, 60)]]
    fp32 = verify_variant(
        VariantReport("x", "onnx", "fp32", "-"), reference, _Drifting(reference, offset), prompts, windows, 64
    )
    assert fp32.passed is not fails, fp32.failures
    if offset:
        assert "max |logit difference|" in fp32.failures[0]
    q = verify_variant(
        VariantReport("y", "onnx", "int8", "-"), reference, _Drifting(reference, offset), prompts, windows, 64
    )
    assert q.passed is (offset < 1.0), q.failures
    if offset > 1.0:
        assert any("top-1 agreement" in f for f in q.failures) and any("perplexity" in f for f in q.failures)


def test_held_out_text_is_the_training_split_when_present(small_model_dir, tmp_path):
    """--eval-text wins; else effllm-train's data/heldout.bin beside the model, if intact and in vocabulary."""
    from effllm.export.cli import build_parser
    from effllm.export.inputs import resolve_plan
    from export_helpers import write_train_heldout

    run = tmp_path / "run"
    shutil.copytree(small_model_dir, run / "model")

    def plan(*flags):
        return resolve_plan(build_parser().parse_args([str(run / "model"), *flags]))

    assert plan().heldout_bin is None and plan().eval_text is None  # falls back to built-in text
    assert plan().out == run / "export"
    write_train_heldout(run, list(range(1, 300)), 512)
    assert plan().heldout_bin == run / "data" / "heldout.bin"
    text = tmp_path / "eval.txt"
    text.write_text("held out words")
    chosen = plan("--eval-text", str(text))
    assert chosen.eval_text == text and chosen.heldout_bin is None
    write_train_heldout(run, list(range(1, 300)), 4096)  # another tokenizer's ids: not usable here
    assert plan().heldout_bin is None
    (run / "data" / "heldout.bin").write_bytes(b"\0")  # truncated
    assert plan().heldout_bin is None


def test_judged_and_calibration_windows_never_share_text_when_there_are_two():
    """Long text: EVAL_WINDOWS judged, then CALIBRATION_WINDOWS calibrate; short text is split between the
    two (calibration the last third); only a single window serves both."""
    from effllm.export.verify import CALIBRATION_WINDOWS, EVAL_WINDOW, EVAL_WINDOWS, calibration_windows, eval_windows

    def split(windows):
        ids = list(range(windows * EVAL_WINDOW))
        return eval_windows(ids, 2048), calibration_windows(ids, 2048)

    judged, calibration = split(EVAL_WINDOWS + CALIBRATION_WINDOWS + 5)
    assert (len(judged), len(calibration)) == (EVAL_WINDOWS, CALIBRATION_WINDOWS)
    assert calibration[0][0] == EVAL_WINDOWS * EVAL_WINDOW  # right after the judged ones
    for total in (2, 9, EVAL_WINDOWS + 1):
        judged, calibration = split(total)
        assert len(judged) + len(calibration) == total and judged and calibration
        assert not {w[0] for w in judged} & {w[0] for w in calibration}
    assert split(1)[0] == split(1)[1] and len(split(1)[0]) == 1


def test_held_out_nll_is_torchs_cross_entropy_on_real_scale_logits():
    """The verification's NLL (float32 exponentials, float64 sums) against torch's float64 cross-entropy, on
    logits as large and peaked as a real model's (a 49,152 vocabulary, one token ~40 above the rest)."""
    from effllm.export.verify import _nll

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(128, 49152, generator=generator) * 4
    targets = torch.randint(0, 49152, (128,), generator=generator)
    logits[torch.arange(0, 128, 2), targets[::2]] += 40  # half the rows predict their target with confidence
    expected = torch.nn.functional.cross_entropy(logits.double(), targets, reduction="sum").item()
    assert _nll(logits.numpy(), targets.numpy()) == pytest.approx(expected, rel=1e-9)


def test_a_missed_threshold_fails_the_command(small_model_dir, tmp_path, monkeypatch, capsys):
    """Exit code 1 and verify.json says which check failed; the files are published for inspection."""
    import effllm.export.verify as verify

    monkeypatch.setitem(verify.QUANTIZED_THRESHOLDS, "int8", {"min_top1_agreement": 1.01, "max_ppl_increase": 0.1})
    out = tmp_path / "out"
    code = main(
        [str(small_model_dir), "--format", "onnx", "--quantize", "int8", "--out", str(out), "--max-seq-len", "64"]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "verification failed for onnx-int8" in captured.err
    assert "| onnx-int8 |" in captured.out and "FAIL: top-1 agreement" in captured.out
    report = json.loads((out / "verify.json").read_text())
    assert report["passed"] is False
    variants = {v["name"]: v for v in report["variants"]}
    assert variants["onnx"]["passed"] and not variants["onnx-int8"]["passed"]
    assert (out / "onnx-int8" / "model.onnx").is_file()
