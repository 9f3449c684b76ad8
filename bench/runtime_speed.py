"""Benchmark: every runtime on ~95M-parameter irregular models and on a uniform one of the same size.

The models (bench/runtime_models.py): uniform, irregular (widths as pruning leaves them) and
irregular-g32 (every width a multiple of 32), random weights, each exported with effllm-export
--quantize all (ONNX fp32/int8/int4, ExecuTorch fp32/8da4w, GGUF f16/q8_0/q4_0/q4_k_m when llama.cpp is
installed; verified). effllm-bench's measurements then run on all of them in one run, interleaved
(irregular, irregular-g32, uniform, ... for each backend and variant) so that load from other
processes hits them alike; --paired N (bench/runtime_paired.py) times them in one process instead.

Writes bench/results/runtime_speed.{json,md,png}; the models and exports go to --work
(default runs/bench-runtime, reused when present).

    python bench/runtime_speed.py                      # build (first time), export, measure; 2 threads
    python bench/runtime_speed.py --repeats 5 --threads 2
    python bench/runtime_speed.py --extra runs/quickstart/export   # also measure another model
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from runtime_models import MODEL_SHAPES, build_models, export
from runtime_paired import COMPARED, paired

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/bench-runtime", help="where models and exports go (reused)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--backends", nargs="+", default=None)
    parser.add_argument("--variants", nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the two models this many times per target")
    parser.add_argument("--extra", nargs="*", default=[], help="other models/exports to measure in the same run")
    parser.add_argument("--out", default=str(RESULTS / "runtime_speed"), help="output path without extension")
    parser.add_argument("--build-only", action="store_true", help="build and export the models, measure nothing")
    parser.add_argument(
        "--paired",
        type=int,
        default=0,
        metavar="N",
        help="instead of the table: load the irregular models and the uniform one into one process per (backend, "
        "variant) and time them alternately N times each (decode and prefill); writes runtime_speed_paired.*",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from effllm.runtime.bench_report import add_ratios, enrich, portable_path, read_verify, write_report
    from effllm.runtime.bench_targets import BenchSettings, plan_targets
    from effllm.runtime.bench_worker import run_target
    from effllm.runtime.machine import RunConditions

    work = Path(args.work)
    dirs = build_models(work)
    exports = {}
    for name, model_dir in dirs.items():
        exports[name], code = export(model_dir, args.max_seq_len)
        if code not in (0, 1):
            print(f"export of {name} failed (exit {code})", file=sys.stderr)
            return code
    if args.build_only:
        return 0
    settings = BenchSettings(
        threads=args.threads,
        prompt_lengths=tuple(args.prompt_lengths),
        new_tokens=args.new_tokens,
        warmup=args.warmup,
        repeats=args.repeats,
    )
    if args.paired:
        return paired(exports, settings, args)
    models = {name: plan_targets(exports[name], args.backends, args.variants, label=name) for name in exports}
    for extra in args.extra:
        label = Path(extra).resolve().parent.name if Path(extra).name in ("export", "model") else Path(extra).name
        models[label] = plan_targets(extra, args.backends, args.variants, label=label)
        exports[label] = Path(extra)

    conditions = RunConditions(args.threads)
    print(
        f"read bandwidth {conditions.bandwidths[0] / 1e9:.1f} GB/s on {args.threads} threads; "
        f"load {conditions.load_start}",
        file=sys.stderr,
    )
    measured: dict[tuple, list[tuple]] = {}
    keys = []
    for targets in models.values():
        keys += [(t.backend, t.variant) for t in targets]
    order = list(dict.fromkeys(keys))
    started = time.time()
    for backend, variant in order:
        for _ in range(args.rounds):
            for name, targets in models.items():
                target = next((t for t in targets if (t.backend, t.variant) == (backend, variant)), None)
                if target is None:
                    continue
                result = run_target(target, settings)
                measured.setdefault((name, backend, variant), []).append((target, result))
                decode = (result.get("decode") or {}).get("tokens_per_s")
                print(
                    f"[{time.time() - started:6.0f} s] {name:9s} {backend:11s} {variant:16s} "
                    f"decode {decode or float('nan'):7.1f} tok/s  {result.get('error') or ''}",
                    file=sys.stderr,
                )
    bandwidth, machine = conditions.finish()
    final = [
        merge_rounds([enrich(target, result, bandwidth, read_verify(target.export_dir)) for target, result in runs])
        for runs in measured.values()
    ]
    add_ratios(final)
    report = {
        "kind": "cpu",
        "model": ", ".join(f"{n}: {portable_path(exports[n])}" for n in models),
        "machine": machine,
        "settings": vars(args) | {"prompt_lengths": args.prompt_lengths},
        "results": final,
        "irregular_vs_uniform": compare(final),
        "shapes": {name: MODEL_SHAPES[name]() for name in dirs},
    }
    out = Path(args.out)
    paths = write_report(report, out.parent, stem=out.name)
    summary = comparison_markdown(report["irregular_vs_uniform"])
    with open(paths[1], "a") as f:
        f.write("\n## Irregular vs uniform (same parameter count)\n\n" + summary + "\n\n" + UNPAIRED_CAVEAT + "\n")
    from effllm.runtime.bench_report import markdown_table

    print(markdown_table(report))
    print("\n" + summary)
    print(f"wrote {', '.join(map(str, paths))}", file=sys.stderr)
    return 0


UNPAIRED_CAVEAT = (
    "These ratios compare runs made minutes apart, so load from other tenants skews them; "
    "`--paired N` (runtime_speed_paired.md) times both models alternately in one process."
)


def merge_rounds(runs: list[dict]) -> dict:
    """One row from several rounds of the same target: medians of decode, prefill and TTFT over the rounds."""
    row = dict(runs[0])
    ok = [r for r in runs if not r.get("error")]
    if len(runs) == 1 or not ok:
        return row
    row["rounds"] = len(ok)
    decode = [r["decode"]["tokens_per_s"] for r in ok]
    row["decode"] = dict(ok[0]["decode"], tokens_per_s=statistics.median(decode), rounds_tokens_per_s=decode)
    row["ttft_s"] = statistics.median(r["ttft_s"] for r in ok)
    row["load_s"] = statistics.median(r["load_s"] for r in ok)
    row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    if all(r.get("model_rss_mb") is not None for r in ok):
        row["model_rss_mb"] = max(r["model_rss_mb"] for r in ok)
    prefill = {}
    for n, first in (ok[0].get("prefill") or {}).items():
        if first is None:
            prefill[n] = None
            continue
        seconds = statistics.median(r["prefill"][n]["median_s"] for r in ok)
        prefill[n] = dict(first, median_s=seconds, tokens_per_s=int(n) / seconds)
    row["prefill"] = prefill
    roof = row.get("roofline_tokens_per_s")
    row["roofline_fraction"] = row["decode"]["tokens_per_s"] / roof if roof else None
    return row


def compare(rows: list[dict]) -> list[dict]:
    """Each irregular model's latency over the uniform one's per (backend, variant): decode ms/token, prefill, TTFT."""
    by = {(r.get("model"), r["backend"], r["variant"]): r for r in rows}
    out = []
    for (model, backend, variant), irr in by.items():
        if model not in COMPARED:
            continue
        uni = by.get(("uniform", backend, variant))
        if not uni or irr.get("error") or uni.get("error"):
            continue

        def ratio(a, b):
            return a / b if a and b else None

        d_irr, d_uni = (irr.get("decode") or {}).get("tokens_per_s"), (uni.get("decode") or {}).get("tokens_per_s")
        entry = {
            "model": model,
            "backend": backend,
            "variant": variant,
            "decode_latency_ratio": ratio(d_uni, d_irr),  # irregular ms/token over uniform ms/token
            "ttft_ratio": ratio(irr.get("ttft_s"), uni.get("ttft_s")),
        }
        for n, p in (irr.get("prefill") or {}).items():
            q = (uni.get("prefill") or {}).get(n)
            entry[f"prefill_{n}_latency_ratio"] = ratio(p and p.get("median_s"), q and q.get("median_s"))
        out.append(entry)
    return out


def comparison_markdown(entries: list[dict]) -> str:
    if not entries:
        return "(no pairs measured)"
    keys = [k for k in entries[0] if k.endswith("_ratio")]
    lines = ["| model | backend | variant | " + " | ".join(k.replace("_", " ") for k in keys) + " |"]
    lines.append("|" + "---|" * (len(keys) + 3))
    for e in entries:
        cells = ["-" if e[k] is None else f"{e[k]:.3f}" for k in keys]
        lines.append(f"| {e['model']} | {e['backend']} | {e['variant']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Ratios are irregular over uniform latency (1.00 = same; < 1.10 is within 10%).")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
