"""effllm-export's work once the input is checked: export every variant, verify it, publish.

Everything is built and verified in a staging directory inside OUT and moved into place at the
end, so an export that crashes or is interrupted leaves OUT as it was. A variant that fails its
verification thresholds is still published (so it can be inspected), verify.json marks it failed,
and the command exits with 1. verify.json describes the variants this run wrote (an earlier run's
other variants stay, with their own files).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

from effllm.runtime.model_files import model_bytes
from effllm.runtime.native import quiet_native_output

from .calibration import Calibration, load_heldout
from .inputs import Plan, Variant

# Libraries whose log records below ERROR, while they export, are progress or environment notes (torch.onnx's
# "torchvision is not installed. Skipping torchvision::nms" and its kin), not news for our users.
LIBRARY_LOGGERS = ("torch", "onnxscript", "onnx_ir", "executorch", "torchao")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet_loggers(names=LIBRARY_LOGGERS, level: int = logging.ERROR):
    """Raise these loggers to ``level`` meanwhile, and restore their own levels afterwards."""
    loggers = [logging.getLogger(name) for name in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        for lg, old in zip(loggers, saved):
            lg.setLevel(old)


@contextlib.contextmanager
def quiet_progress_bars():
    """No transformers progress bar ("Loading weights") meanwhile; its setting is restored afterwards."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_libraries(native: bool = False):
    """Keep the exporters' own chatter off the terminal while they run: torch.onnx's step lines (stdout),
    warnings, and library log records below ERROR (torch.onnx's "torchvision is not installed.
    Skipping torchvision::nms" and its kin). Everything is restored when the block ends.

    native=True also silences C++ code that writes to the process's stdout/stderr directly (the
    ExecuTorch runtime logs CPU probing when it loads); Python errors still surface, after it ends.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        stack.enter_context(quiet_loggers())
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        if native:
            stack.enter_context(quiet_native_output())
        yield


def run_export(plan: Plan) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from effllm import EfficientLLMForCausalLM
    from effllm.model.params import architecture_summary

    from .executorch_export import export_executorch
    from .gguf_export import export_gguf
    from .gguf_quantize import quantize_gguf
    from .onnx_export import export_onnx
    from .quantize import eight_bit_weights, quantize_onnx_dir

    say(f"effllm-export: {plan.model_dir} -> {plan.out} ({', '.join(v.name for v in plan.variants)})")
    with quiet_progress_bars():
        model = EfficientLLMForCausalLM.from_pretrained(plan.model_dir, dtype="float32").eval().requires_grad_(False)
    say(architecture_summary(model.config))

    heldout = load_heldout(plan)
    calibration = Calibration(model, heldout, plan.max_seq_len)  # computed when a quantizer first asks
    staging = plan.out / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    steps = len(plan.variants) * (2 if plan.verify else 1)
    step = 0
    reports = []
    try:
        verifier = None
        if plan.verify:
            from .verifier import Verifier

            verifier = Verifier(plan, model, heldout)
        for variant in plan.variants:
            step += 1
            say(f"[{step}/{steps}] export {variant.name}{_slow_hint(variant)} ...")
            start = time.perf_counter()
            target = staging / variant.name
            with quiet_libraries():
                if variant.format == "onnx" and variant.quantization == "fp32":
                    export_onnx(model, target, plan.max_seq_len, model_dir=plan.model_dir)
                elif variant.format == "onnx":
                    quantize_onnx_dir(
                        staging / "onnx", target, variant.quantization, plan.group_size, calibration.by_onnx_weight(),
                        eight_bit=eight_bit_weights(model),
                    )  # fmt: skip
                elif variant.format == "gguf" and variant.quantization in ("fp32", "f16"):
                    export_gguf(model, target, plan.max_seq_len, plan.model_dir, plan.gguf_dtype)
                elif variant.format == "gguf":
                    quantize_gguf(
                        staging / "gguf", target, variant.quantization, importance=calibration.importance(),
                        model=model, grams=calibration.by_linear(),
                    )  # fmt: skip
                else:
                    quantize = None if variant.quantization == "fp32" else variant.quantization
                    grams = calibration.by_linear() if quantize else None
                    export_executorch(model, target, plan.max_seq_len, quantize, plan.group_size, plan.model_dir, grams)
            seconds = time.perf_counter() - start
            size = model_bytes(target)
            say(f"      done in {seconds:.1f} s, {size / 2**20:.2f} MiB")
            if verifier is not None:
                step += 1
                say(f"[{step}/{steps}] verify {variant.name} against torch ...")
                with quiet_libraries(native=variant.format != "onnx"):
                    report = verifier.verify(variant, target)
                report.export_seconds, report.size_bytes = seconds, size
                reports.append(report)
                say(f"      {'passed' if report.passed else 'FAILED: ' + '; '.join(report.failures)}")
        if verifier is not None:
            from .verify_report import write_reports

            write_reports(reports, staging, {**verifier.summary_fields(), **calibration.summary_fields()})
        publish(staging, plan.out, [v.name for v in plan.variants], plan.verify)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    if not plan.verify:
        say(f"exported to {plan.out} (verification skipped: --no-verify)")
        return 0
    from .verify_report import format_table

    print(format_table(reports))
    failed = [r for r in reports if not r.passed]
    if failed:
        say(
            f"effllm-export: verification failed for {', '.join(r.name for r in failed)}; the files are in "
            f"{plan.out}, but do not meet the thresholds (details in {plan.out / 'verify.json'})"
        )
        return 1
    say(f"exported and verified: {plan.out} (verify.json, verify.md)")
    return 0


def _slow_hint(variant: Variant) -> str:
    return (
        " (XNNPACK lowering: the slow step, 3-10 minutes for a 100M-parameter model on 2 cores)"
        if variant.format == "executorch"
        else ""
    )


def publish(staging: Path, out: Path, names: list[str], verified: bool) -> None:
    """Move each finished variant (and the reports) from staging into out, replacing older ones."""
    moves = list(names) + (["verify.json", "verify.md"] if verified else [])
    for name in moves:
        target = out / name
        if target.exists():
            old = out / f".old-{name}-{os.getpid()}"
            target.rename(old)
            (staging / name).rename(target)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            (staging / name).rename(target)
    if not verified:  # reports from an earlier run would describe files that were just replaced
        for stale in ("verify.json", "verify.md"):
            (out / stale).unlink(missing_ok=True)
