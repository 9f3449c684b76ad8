"""Every runtime's 4-bit variant against llama.cpp's Q4_0 on the same model, timed in turn in one process.

The issue's aim "at least as fast as llama.cpp's Q4_0" compares decode speeds; in separate processes
minutes apart (bench/runtime_speed.py's table) load from other tenants of a shared VM moves them by up to
2x. Here onnxruntime int4, onnxruntime-genai int4, ExecuTorch 8da4w and llama.cpp q4_0 of one model are
loaded into one process and timed alternately (runtime_paired.paired_worker: decode 64 tokens after a
128-token prompt, the order reversed every round); a ratio is the median over rounds of a variant's decode
time over llama.cpp's in the same round (< 1: faster than llama.cpp).

    python bench/runtime_speed.py --build-only      # the ~95M models and their exports
    python bench/four_bit_paired.py --rounds 7      # -> bench/results/four_bit_paired.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from runtime_paired import add_decode_arguments, decode_spec, paired_worker

RESULTS = Path(__file__).resolve().parent / "results"
# name -> (backend, variant directory, file inside it or "")
TARGETS = {
    "onnxruntime int4": ("onnxruntime", "onnx-int4", ""),
    "genai int4": ("genai", "onnx-int4", ""),
    "executorch 8da4w": ("executorch", "executorch-8da4w", "model.pte"),
    "llama.cpp q4_0": ("llamacpp", "gguf-q4_0", ""),
}
REFERENCE = "llama.cpp q4_0"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/bench-runtime", help="bench/runtime_speed.py's --work")
    parser.add_argument("--models", nargs="+", default=["irregular", "irregular-g32", "uniform"])
    add_decode_arguments(parser, RESULTS / "four_bit_paired")
    args = parser.parse_args(argv)
    from effllm.runtime.machine import load_average, machine_info

    from effllm.common.fileio import write_atomic

    load_start = load_average()
    rows = []
    for model in args.models:
        export = Path(args.work) / model / "export"
        paths = {name: str(export / vdir / file) for name, (_, vdir, file) in TARGETS.items()}
        missing = [p for p in paths.values() if not Path(p).exists()]
        if missing:
            print(f"{model}: missing {missing}; run bench/runtime_speed.py --build-only first", file=sys.stderr)
            return 2
        backends = {name: backend for name, (backend, _, _) in TARGETS.items()}
        times = paired_worker(decode_spec(paths, backends, args.threads, args.rounds))
        ref = times[f"decode_{REFERENCE}"]
        for name in TARGETS:
            mine = times[f"decode_{name}"]
            ratios = [a / b for a, b in zip(mine, ref)]
            rows.append(
                {
                    "model": model,
                    "variant": name,
                    "decode_tokens_per_s": 64 / statistics.median(mine),
                    "latency_over_q4_0": statistics.median(ratios),
                    "range": [min(ratios), max(ratios)],
                    "times_s": mine,
                }
            )
            print(
                f"{model:14s} {name:17s} {rows[-1]['decode_tokens_per_s']:6.1f} tok/s  x{rows[-1]['latency_over_q4_0']:.3f}",
                file=sys.stderr,
            )
    report = {
        "machine": machine_info(args.threads) | {"load_average_start": load_start, "load_average_end": load_average()},
        "rounds": args.rounds,
        "rows": rows,
    }
    m = report["machine"]
    lines = [
        "# 4-bit decode against llama.cpp Q4_0, timed in turn in one process",
        "",
        f"Machine: {m.get('cpu')}, {args.threads} threads; load average {m['load_average_start']} at start, "
        f"{m['load_average_end']} at end. {args.rounds} rounds of decode (64 tokens after a 128-token prompt) per "
        "variant in turn; ratio = median over rounds of the variant's decode time / llama.cpp q4_0's in the same "
        "round (< 1.00: faster than llama.cpp). llama.cpp runs without its repacked / AMX CPU kernels (SIGILL on "
        "this VM), so it is understated.",
        "",
        "| model | variant | decode tok/s | latency / llama.cpp q4_0 | range over rounds |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["range"]
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['decode_tokens_per_s']:.1f} | {r['latency_over_q4_0']:.3f} | {lo:.2f}-{hi:.2f} |"
        )
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
