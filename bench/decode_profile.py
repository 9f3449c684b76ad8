"""Where decode time goes: per-operator profiles of the exported variants, one token at a time.

For each model and variant, a 128-token prompt is prefilled and then --new-tokens tokens are decoded
greedily (batch 1, --threads threads), with the runtime's own profiler on:
    onnxruntime   SessionOptions.enable_profiling: every node's kernel time, summed by operator type
    ExecuTorch    ETDump (executorch.devtools.Inspector): every operator and XNNPACK delegate call
The decode steps' times are summed per operator (prefill is left out) and set against the wall time
of a step measured around the runtime call, so what no operator accounts for (the Python loop,
binding inputs and outputs, the runtime's dispatch) shows as "outside the kernels". The roofline
(weights read per token over the measured memory bandwidth) says how far each variant is from the
bound.

    python bench/runtime_speed.py --build-only      # the ~95M irregular / uniform models and exports
    python bench/decode_profile.py                  # -> bench/results/decode_profile.{json,md}
    python bench/decode_profile.py --variants onnx-int4 --models irregular --new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("onnx", "onnx-int8", "onnx-int4", "executorch", "executorch-8da4w")


def decode_steps(backend, prompt: list[int], new_tokens: int) -> list[float]:
    """Prefill ``prompt``, then decode greedily; the wall seconds of each decode step."""
    logits = backend.forward(prompt, 0)
    position, times = len(prompt), []
    for _ in range(new_tokens):
        token = int(np.argmax(logits))
        start = time.perf_counter()
        logits = backend.forward([token], position)
        times.append(time.perf_counter() - start)
        position += 1
    return times


def onnx_profile(variant_dir: Path, prompt: list[int], new_tokens: int, threads: int) -> dict:
    """Per-operator-type decode time (ms per token) from onnxruntime's profiler."""
    from effllm.runtime.onnx_backend import OnnxRuntimeBackend

    with tempfile.TemporaryDirectory() as tmp:
        backend = OnnxRuntimeBackend(variant_dir, threads=threads, profile_prefix=str(Path(tmp) / "ort"))
        times = decode_steps(backend, prompt, new_tokens)
        events = json.loads(backend.end_profiling().read_text())
        backend.close()
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    decode_runs = runs[1:]  # the first run is the prefill
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in decode_runs]
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if any(lo <= e["ts"] <= hi for lo, hi in windows):
            by_op[e["args"].get("op_name", "?")] += e["dur"] / 1000.0
    steps = len(decode_runs)
    return {
        "wall_ms": 1000.0 * statistics.median(times),
        "runtime_ms": sum(e["dur"] for e in decode_runs) / 1000.0 / steps,
        "ops_ms": {op: ms / steps for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])},
    }


def executorch_profile(variant_dir: Path, prompt: list[int], new_tokens: int, threads: int) -> dict:
    """Per-operator decode time (ms per token) from an ETDump: XNNPACK's own operators, the rest of its calls, the others."""
    from effllm.runtime.executorch_backend import ExecuTorchBackend
    from effllm.runtime.native import quiet_native_output
    from executorch.devtools import Inspector

    with tempfile.TemporaryDirectory() as tmp, quiet_native_output():
        backend = ExecuTorchBackend(variant_dir, threads=threads, etdump=True)
        times = decode_steps(backend, prompt, new_tokens)
        dump = backend.write_etdump(Path(tmp) / "run.etdp")
        backend.close()
        inspector = Inspector(etdump_path=str(dump))
    blocks = [b for b in inspector.event_blocks if b.name.startswith("Execute")]
    decode_blocks = blocks[-new_tokens:]  # the forward calls, oldest first; the prefill comes before these
    raw: dict[str, float] = defaultdict(float)
    for block in decode_blocks:
        for event in block.events:
            if event.perf_data and event.name != "OPERATOR_CALL":  # OPERATOR_CALL wraps each native_call_*
                name = event.name.split(" #")[0]  # XNNPACK numbers its operators: "... GEMM #2"
                raw[f"XNNPACK {name}" if event.is_delegated_op else name] += float(np.sum(event.perf_data.raw))
    total = raw.pop("Method::execute", 0.0)
    delegate = raw.pop("DELEGATE_CALL", 0.0)
    inside = sum(ms for name, ms in raw.items() if name.startswith("XNNPACK "))
    raw["XNNPACK calls, outside its operators"] = delegate - inside
    # ETDump's clock does not tick in the nanoseconds Inspector assumes here, so its times are scaled to
    # the steps' wall time: shares of Method::execute are exact, milliseconds approximate.
    wall_ms = 1000.0 * statistics.median(times)
    scale = wall_ms / total * len(decode_blocks) if total else 0.0
    steps = max(len(decode_blocks), 1)
    return {
        "wall_ms": wall_ms,
        "runtime_ms": wall_ms,
        "ops_ms": {op: ms * scale / steps for op, ms in sorted(raw.items(), key=lambda kv: -kv[1])},
    }


def weights_bytes(variant_dir: Path, variant: str) -> int | None:
    """Weights one decode step reads, as effllm-bench's roofline counts them for the same variant."""
    from effllm.runtime.bench_targets import plan_targets
    from effllm.runtime.roofline import weights_per_token

    backend = "onnxruntime" if variant.startswith("onnx") else "executorch"
    (target,) = plan_targets(variant_dir.parent, [backend], [variant])
    return weights_per_token(target)[0]


def markdown(report: dict) -> str:
    lines = [
        "# Where quantized decode time goes",
        "",
        f"Machine: {report['machine']}; threads {report['threads']}; prompt {report['prompt']} tokens, "
        f"{report['new_tokens']} decode steps (medians of the step wall time; operator times are means per step); "
        f"load average {report['load_before']} before, {report['load_after']} after.",
        "",
        "| model | variant | step ms (wall) | in the runtime ms | outside the kernels ms | weights MiB/token | "
        "roofline ms | achieved/roofline | top operators, ms per token (share of the step) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        ops = row["ops_ms"]
        kernel_sum = sum(ops.values())
        top = ", ".join(f"{op} {ms:.2f} ({ms / row['wall_ms']:.0%})" for op, ms in list(ops.items())[:6])
        roof = row.get("roofline_ms")
        lines.append(
            f"| {row['model']} | {row['variant']} | {row['wall_ms']:.2f} | "
            f"{row['runtime_ms']:.2f} | {row['wall_ms'] - kernel_sum:.2f} | "
            f"{(row['weights_bytes'] or 0) / 2**20:.1f} | {roof:.2f} | {roof / row['wall_ms']:.2f} | {top} |"
            if roof and row["runtime_ms"] is not None
            else f"| {row['model']} | {row['variant']} | {row['wall_ms']:.2f} | - | - | - | - | - | {top} |"
        )
    lines += [
        "",
        "step ms (wall): one decode step timed around the runtime call (the Python loop's own share included). "
        "in the runtime: onnxruntime's model_run / ExecuTorch's Method::execute. outside the kernels: the wall "
        "time no operator accounts for. roofline ms: weights read per token / measured read bandwidth.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--work", default="runs/bench-runtime", help="bench/runtime_speed.py's --work (models, exports)"
    )
    parser.add_argument("--models", nargs="+", default=["irregular", "uniform"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(RESULTS / "decode_profile"), help="output path without extension")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from effllm.runtime.machine import cpu_name, load_average, measure_bandwidth

    bandwidth = measure_bandwidth(args.threads)
    report = {
        "machine": f"{cpu_name()}, {os.cpu_count()} logical CPUs, read bandwidth {bandwidth / 1e9:.1f} GB/s",
        "threads": args.threads,
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "load_before": load_average(),
        "rows": [],
    }
    rng = np.random.default_rng(0)
    for variant in args.variants:
        for model in args.models:
            variant_dir = Path(args.work) / model / "export" / variant
            if not variant_dir.is_dir():
                print(
                    f"skip {model}/{variant}: no {variant_dir} (run bench/runtime_speed.py --build-only)",
                    file=sys.stderr,
                )
                continue
            prompt = rng.integers(1, 2000, size=args.prompt).tolist()
            profile = onnx_profile if variant.startswith("onnx") else executorch_profile
            print(f"{model} {variant} ...", file=sys.stderr, flush=True)
            row = {"model": model, "variant": variant, **profile(variant_dir, prompt, args.new_tokens, args.threads)}
            row["weights_bytes"] = weights_bytes(variant_dir, variant)
            row["roofline_ms"] = 1000.0 * row["weights_bytes"] / bandwidth if row["weights_bytes"] else None
            report["rows"].append(row)
            print(f"  step {row['wall_ms']:.2f} ms: {dict(list(row['ops_ms'].items())[:4])}", file=sys.stderr)
    report["load_after"] = load_average()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
