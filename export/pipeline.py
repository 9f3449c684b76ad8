"""effllm-export's work once the input is checked: export every variant, verify it, publish.

Everything is built and verified in a staging directory inside OUT and moved into place at the
end, so an export that crashes or is interrupted leaves OUT as it was. A variant that fails its
verification thresholds is still published (so it can be inspected), verify.json marks it failed,
and the command exits with 1. verify.json describes the variants this run wrote (an earlier run's
other variants stay, with their own files).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from effllm.runtime.model_files import model_bytes

from .calibration import Calibration, load_heldout
from .inputs import Plan, Variant
from .quiet import quiet_libraries, quiet_progress_bars


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_export(plan: Plan) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from effllm import EfficientLLMForCausalLM
    from effllm.model.params import architecture_summary

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
    lowering = None
    torch_threads = torch.get_num_threads()
    try:
        lowering = start_lowering(plan, model, staging, calibration)
        background = set(lowering.jobs) if lowering else set()
        # Beside the lowering workers (one core each) this process takes the other cores, no more: a thread
        # pool larger than its share of the machine waits at every barrier for threads that are not running.
        threads = max(1, (os.cpu_count() or 1) - len(lowering.processes)) if lowering else None
        if threads:
            torch.set_num_threads(threads)
        verifier = None
        if plan.verify:
            from .verifier import Verifier

            verifier = Verifier(plan, model, heldout, threads)
        # the variants lowered in the background come last: everything else runs while they are lowered
        for variant in sorted(plan.variants, key=lambda v: v.name in background):
            step += 1
            target = staging / variant.name
            if variant.name in background:
                say(f"[{step}/{steps}] export {variant.name}: waiting for its background lowering ...")
                seconds = lowering.wait(variant.name)
                if verifier is not None and not lowering.running():  # the machine is this process's again
                    torch.set_num_threads(torch_threads)
                    verifier.threads = None
            else:
                say(f"[{step}/{steps}] export {variant.name}{_slow_hint(variant)} ...")
                seconds = export_variant(plan, variant, model, target, staging, calibration, threads)
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
        order = [v.name for v in plan.variants]
        reports.sort(key=lambda r: order.index(r.name))
        if verifier is not None:
            from .verify_report import write_reports

            write_reports(reports, staging, {**verifier.summary_fields(), **calibration.summary_fields()})
        publish(staging, plan.out, [v.name for v in plan.variants], plan.verify)
    finally:
        torch.set_num_threads(torch_threads)
        if lowering is not None:
            lowering.close()
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


def export_variant(
    plan: Plan, variant: Variant, model, target: Path, staging: Path, calibration, threads: int | None = None
) -> float:
    """Write one variant into ``target`` (the quantized ONNX and GGUF ones from their fp32 siblings in
    ``staging``; llama.cpp's quantizer on ``threads``, None: every core); the seconds it took."""
    from .executorch_export import export_executorch
    from .gguf_export import export_gguf
    from .gguf_quantize import quantize_gguf
    from .onnx_export import export_onnx
    from .quantize import eight_bit_weights, quantize_onnx_dir

    start = time.perf_counter()
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
                staging / "gguf", target, variant.quantization, threads, importance=calibration.importance(),
                model=model, grams=calibration.by_linear(),
            )  # fmt: skip
        else:
            quantize = None if variant.quantization == "fp32" else variant.quantization
            grams = calibration.by_linear() if quantize else None
            export_executorch(model, target, plan.max_seq_len, quantize, plan.group_size, plan.model_dir, grams)
    return time.perf_counter() - start


def start_lowering(plan: Plan, model, staging: Path, calibration):
    """The .pte variants' lowering started in background processes (lowering_workers.py), or None when
    there is none to lower or it runs in this process (--lowering-workers 0, or too little memory)."""
    from .lowering_workers import LoweringJob, LoweringWorkers, worker_count

    jobs = [
        LoweringJob(v.name, staging / v.name, None if v.quantization == "fp32" else v.quantization)
        for v in plan.variants
        if v.format == "executorch"
    ]
    if not jobs:
        return None
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    workers = plan.lowering_workers if plan.lowering_workers is not None else worker_count(len(jobs), fp32_bytes)
    workers = min(workers, len(jobs))
    if workers == 0:
        return None
    grams = calibration.by_linear() if any(job.quantize for job in jobs) else None
    say(f"lowering {', '.join(job.name for job in jobs)} in {workers} background process(es) (XNNPACK) ...")
    return LoweringWorkers(jobs, workers, plan.model_dir, plan.max_seq_len, plan.group_size, grams)


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
