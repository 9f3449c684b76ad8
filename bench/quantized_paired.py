"""Decode speed of one model's quantized variants from two exports (say, before and after a change of the
quantizers), timed in turn in one process so that load from other processes hits both alike.

For each (backend, variant) both files are loaded into one worker (runtime_paired.paired_worker: decode 64
tokens after a 128-token prompt, the order reversed every round); a ratio is the median over rounds of the
new file's decode time over the old one's in the same round (> 1: the new file decodes slower).

    python bench/quantized_paired.py --old OLD_EXPORT --new NEW_EXPORT --rounds 7
        -> bench/results/quantized_paired.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from four_bit_paired import TARGETS as FOUR_BIT_TARGETS
from runtime_paired import DECODE_PROMPT, DECODE_TOKENS, add_decode_arguments, decode_spec, paired_worker

RESULTS = Path(__file__).resolve().parent / "results"
# name -> (backend, variant directory, file inside it or ""): four_bit_paired's 4-bit targets and the 8-bit ones
TARGETS = {
    "onnxruntime int8": ("onnxruntime", "onnx-int8", ""),
    **FOUR_BIT_TARGETS,
    "llama.cpp q8_0": ("llamacpp", "gguf-q8_0", ""),
    "llama.cpp q4_k_m": ("llamacpp", "gguf-q4_k_m", ""),
}


def render(report: dict) -> str:
    """The markdown table of a report."""
    m = report["machine"]
    lines = [
        "# Quantized variants, old export against new, decode timed in turn in one process",
        "",
        f"Old: `{report['old']}`; new: `{report['new']}`. Machine: {m.get('cpu')}, {m['threads']} threads; load average "
        f"{m['load_average_start']} at start, {m['load_average_end']} at end. {report['rounds']} rounds of decode "
        f"({DECODE_TOKENS} tokens after a {DECODE_PROMPT}-token prompt) per file in turn; ratio = median over rounds of the new "
        "file's decode time / the old one's in the same round (> 1.00: the new file is slower).",
        "",
        "| variant | old tok/s | new tok/s | new / old latency | range over rounds | old MiB | new MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lo, hi = r["range"]
        lines.append(
            f"| {r['variant']} | {r['old_tokens_per_s']:.1f} | {r['new_tokens_per_s']:.1f} | "
            f"{r['new_over_old_latency']:.3f} | {lo:.2f}-{hi:.2f} | {r['size_old_bytes'] / 2**20:.1f} | "
            f"{r['size_new_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="the earlier export directory (effllm-export's OUT)")
    parser.add_argument("--new", required=True, help="the export directory to compare with it")
    add_decode_arguments(parser, RESULTS / "quantized_paired")
    args = parser.parse_args(argv)
    from effllm.runtime.machine import load_average, machine_info
    from effllm.runtime.model_files import model_bytes

    from effllm.common.fileio import write_atomic

    load_start = load_average()
    rows = []
    for name, (backend, vdir, file) in TARGETS.items():
        paths = {side: Path(root) / vdir / file for side, root in (("old", args.old), ("new", args.new))}
        missing = [str(p) for p in paths.values() if not p.exists()]
        if missing:
            print(f"{name}: skipped, missing {missing}", file=sys.stderr)
            continue
        spec = decode_spec({side: str(p) for side, p in paths.items()}, dict.fromkeys(paths, backend), args.threads, args.rounds)
        times = paired_worker(spec)
        old, new = times["decode_old"], times["decode_new"]
        ratios = [a / b for a, b in zip(new, old)]
        rows.append(
            {
                "variant": name,
                "old_tokens_per_s": DECODE_TOKENS / statistics.median(old),
                "new_tokens_per_s": DECODE_TOKENS / statistics.median(new),
                "new_over_old_latency": statistics.median(ratios),
                "range": [min(ratios), max(ratios)],
                "size_old_bytes": model_bytes(Path(args.old) / vdir),
                "size_new_bytes": model_bytes(Path(args.new) / vdir),
            }
        )
        r = rows[-1]
        print(f"{name:18s} old {r['old_tokens_per_s']:6.1f}  new {r['new_tokens_per_s']:6.1f} tok/s  "
              f"x{r['new_over_old_latency']:.3f}", file=sys.stderr)  # fmt: skip
    report = {
        "machine": machine_info(args.threads) | {"load_average_start": load_start, "load_average_end": load_average()},
        "old": str(args.old),
        "new": str(args.new),
        "rounds": args.rounds,
        "rows": rows,
    }
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), render(report))
    print(f"wrote {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
