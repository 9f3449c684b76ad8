"""Benchmark: every runtime on a ~100M-parameter irregular model and on a uniform one of the same size.

Builds two random-weight models (speed does not depend on the values) that share the vocabulary
(32000, tied embeddings), hidden size (640), depth (16), head size (64) and parameter count (95.2M;
the irregular model's last FFN width absorbs the difference, exactly):
    uniform    every layer 10 query / 5 KV heads, FFN 1792
    irregular  per-layer heads 0..12 with GQA ratios 1-3, FFN widths from 1151 to 2710 that are not
               multiples of 32 (what pruning leaves), one layer without attention
exports both with effllm-export (fp32 + int8 + int4 ONNX, fp32 + 8da4w ExecuTorch, verified), then
runs effllm-bench's measurements on both models in one run, interleaved (irregular, uniform,
irregular, ... for each backend and variant) so that load from other processes hits both alike.

Writes bench/results/runtime_speed.{json,md,png}; the models and exports go to --work
(default runs/bench-runtime, reused when present).

    python bench/runtime_speed.py                      # build (first time), export, measure; 2 threads
    python bench/runtime_speed.py --repeats 5 --threads 2
    python bench/runtime_speed.py --extra runs/quickstart/export   # also measure another model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN, LAYERS, HEAD_DIM, VOCAB = 640, 16, 64, 32000
UNIFORM = dict(num_attention_heads=10, num_key_value_heads=5, intermediate_size=1792)
IRREGULAR_HEADS = [12, 10, 8, 12, 6, 10, 12, 8, 0, 10, 12, 6, 8, 10, 12, 4]
IRREGULAR_KV = [4, 5, 4, 6, 2, 10, 4, 4, 0, 5, 6, 3, 8, 5, 4, 2]
IRREGULAR_FFN = [2311, 1705, 1999, 1403, 2617, 1201, 1893, 2047, 1511, 1777, 2203, 1301, 1609, 2429, 1151, None]


def layer_params(heads: int, kv: int, ffn: int) -> int:
    attn = HIDDEN * (heads + 2 * kv) * HEAD_DIM + heads * HEAD_DIM * HIDDEN + (HIDDEN if heads else 0)
    mlp = 3 * HIDDEN * ffn + (HIDDEN if ffn else 0)
    return attn + mlp


def irregular_shapes() -> dict:
    """Per-layer shapes whose parameter count equals the uniform model's (the last FFN absorbs the difference)."""
    target = LAYERS * layer_params(**dict(zip(("heads", "kv", "ffn"), UNIFORM.values())))
    partial = sum(layer_params(h, k, f) for h, k, f in zip(IRREGULAR_HEADS[:-1], IRREGULAR_KV[:-1], IRREGULAR_FFN[:-1]))
    rest = target - partial - layer_params(IRREGULAR_HEADS[-1], IRREGULAR_KV[-1], 0) - HIDDEN
    ffn = list(IRREGULAR_FFN[:-1]) + [round(rest / (3 * HIDDEN))]
    return dict(num_attention_heads=IRREGULAR_HEADS, num_key_value_heads=IRREGULAR_KV, intermediate_size=ffn)


def build_models(work: Path) -> dict[str, Path]:
    """Random-weight model directories (config, safetensors, tokenizer), built once and reused."""
    import torch

    from effllm import EfficientLLMConfig, EfficientLLMForCausalLM
    from effllm.params import count_parameters, format_count

    dirs = {"irregular": work / "irregular" / "model", "uniform": work / "uniform" / "model"}
    if all((d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file() for d in dirs.values()):
        return dirs
    tokenizer = build_tokenizer(work / "tokenizer")
    shapes = {"uniform": UNIFORM, "irregular": irregular_shapes()}
    for name, path in dirs.items():
        torch.manual_seed(0)
        config = EfficientLLMConfig(
            vocab_size=VOCAB,  # >= the tokenizer's: the built-in corpus yields fewer merges than a real one
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            head_dim=HEAD_DIM,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            **shapes[name],
        )
        model = EfficientLLMForCausalLM(config).eval()
        print(f"{name}: {format_count(count_parameters(config).total)} parameters", file=sys.stderr)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return dirs


def build_tokenizer(path: Path):
    """An ASCII byte-level BPE trained on the built-in corpus (cached); it stops short of VOCAB merges."""
    from transformers import PreTrainedTokenizerFast

    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    from effllm.corpus import python_docs_corpus
    from effllm.tokenizer import train_ascii_bpe

    print("training an ASCII BPE tokenizer on the built-in corpus ...", file=sys.stderr)
    tokenizer = train_ascii_bpe(python_docs_corpus(include_stdlib=True), vocab_size=VOCAB)
    tokenizer.save_pretrained(path)
    return tokenizer


def export(model_dir: Path, max_seq_len: int) -> tuple[Path, int]:
    """effllm-export --quantize all into MODEL/../export (skipped when verify.json is already there)."""
    out = model_dir.parent / "export"
    if (out / "verify.json").is_file():
        return out, 0
    from effllm.export.cli import main as export_main

    print(f"effllm-export {model_dir} --quantize all --max-seq-len {max_seq_len} ...", file=sys.stderr)
    code = export_main([str(model_dir), "--quantize", "all", "--max-seq-len", str(max_seq_len)])
    return out, code


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
        help="instead of the table: load the irregular and the uniform model into one process per (backend, "
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
        "shapes": {"uniform": UNIFORM, "irregular": irregular_shapes()},
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

PAIRED_BOOT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from runtime_speed import paired_worker
print(json.dumps(paired_worker(json.loads(sys.stdin.read()))))
"""


def paired_worker(spec: dict) -> dict:
    """Both models in this process, timed alternately (irregular, uniform, uniform, irregular, ...)."""
    import numpy as np
    from effllm.runtime.generate import load_backend
    from effllm.runtime.native import quiet_native_output

    with quiet_native_output():
        models = {name: load_backend(spec["backend"], spec[name], spec["threads"]) for name in ("irregular", "uniform")}
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, 13000, spec["prompt"]).tolist()
    long_prompt = rng.integers(1, 13000, spec["long_prompt"]).tolist()

    def decode(backend) -> float:
        token = int(np.argmax(backend.forward(prompt, 0)))
        start = time.perf_counter()
        for pos in range(len(prompt), len(prompt) + spec["new_tokens"]):
            token = int(np.argmax(backend.forward([token], pos)))
        return time.perf_counter() - start

    def prefill(backend) -> float:
        start = time.perf_counter()
        backend.forward(long_prompt, 0)
        return time.perf_counter() - start

    times = {f"{kind}_{name}": [] for kind in ("decode", "prefill") for name in models}
    for name in models:  # warm-up
        decode(models[name])
        prefill(models[name])
    for r in range(spec["repeats"]):
        order = ("irregular", "uniform") if r % 2 == 0 else ("uniform", "irregular")
        for name in order:
            times[f"decode_{name}"].append(decode(models[name]))
            times[f"prefill_{name}"].append(prefill(models[name]))
    return times


def paired(exports: dict, settings, args) -> int:
    """Irregular vs uniform latency per (backend, variant), each pair timed in one process, alternately."""
    import subprocess

    from effllm.runtime.bench_targets import BENCH_BACKENDS
    from effllm.runtime.machine import load_average, machine_info
    from effllm.runtime.model_files import FORMAT_OF_BACKEND, find_model_files

    from effllm.fileio import write_atomic

    files = {name: find_model_files(exports[name]) for name in ("irregular", "uniform")}
    load_start = load_average()
    results = []
    for backend in args.backends or BENCH_BACKENDS:
        fmt = FORMAT_OF_BACKEND[backend]
        variants = ["model"] if fmt == "hf" else [n for n, (f, _) in files["irregular"].variants.items() if f == fmt]
        for variant in variants:
            if args.variants and variant not in args.variants:
                continue
            paths = {}
            for name, found in files.items():
                if fmt == "hf":
                    paths[name] = str(found.hf)
                else:
                    vdir = found.variants[variant][1]
                    paths[name] = str(vdir / "model.pte") if fmt == "pte" else str(vdir)
            spec = dict(
                paths,
                backend=backend,
                threads=settings.threads,
                prompt=settings.prompt_lengths[0],
                long_prompt=settings.prompt_lengths[-1],
                new_tokens=settings.new_tokens,
                repeats=args.paired,
            )
            cmd = [sys.executable, "-c", PAIRED_BOOT, str(Path(__file__).resolve().parent)]
            env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(settings.threads))
            proc = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"{backend} {variant}: failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            times = json.loads(proc.stdout.strip().splitlines()[-1])
            entry = {"backend": backend, "variant": variant, "times_s": times}
            for kind in ("decode", "prefill"):
                irr, uni = times[f"{kind}_irregular"], times[f"{kind}_uniform"]
                entry[f"{kind}_latency_ratio"] = statistics.median(a / b for a, b in zip(irr, uni))
                entry[f"{kind}_ratio_range"] = [
                    min(a / b for a, b in zip(irr, uni)),
                    max(a / b for a, b in zip(irr, uni)),
                ]
                entry[f"{kind}_median_s"] = {"irregular": statistics.median(irr), "uniform": statistics.median(uni)}
            entry["decode_tokens_per_s"] = {k: settings.new_tokens / v for k, v in entry["decode_median_s"].items()}
            results.append(entry)
            print(
                f"{backend:11s} {variant:16s} decode irregular/uniform {entry['decode_latency_ratio']:.3f} "
                f"(range {entry['decode_ratio_range'][0]:.2f}-{entry['decode_ratio_range'][1]:.2f}), "
                f"prefill {entry['prefill_latency_ratio']:.3f}",
                file=sys.stderr,
            )
    report = {
        "machine": machine_info(settings.threads)
        | {"load_average_start": load_start, "load_average_end": load_average()},
        "settings": {
            "threads": settings.threads,
            "prompt_tokens": settings.prompt_lengths[0],
            "prefill_tokens": settings.prompt_lengths[-1],
            "new_tokens": settings.new_tokens,
            "pairs": args.paired,
        },
        "shapes": {"uniform": UNIFORM, "irregular": irregular_shapes()},
        "results": results,
    }
    out = Path(args.out + "_paired")
    write_atomic(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    lines = [
        "# Irregular vs uniform model, same parameter count (95.2M), timed in one process, alternately",
        "",
        f"Machine: {report['machine']['cpu']}, {settings.threads} threads; load average "
        f"{load_start} at start, {report['machine']['load_average_end']} at end. Each row: both models loaded in "
        f"one process, {args.paired} alternating pairs of (decode {settings.new_tokens} tokens after a "
        f"{settings.prompt_lengths[0]}-token prompt, prefill {settings.prompt_lengths[-1]} tokens); the ratio is the "
        "median over pairs of irregular time / uniform time (1.00 = same, < 1.10 = within 10%).",
        "",
        "| backend | variant | decode tok/s irregular | decode tok/s uniform | decode latency ratio | ratio range "
        "| prefill latency ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in results:
        lines.append(
            f"| {e['backend']} | {e['variant']} | {e['decode_tokens_per_s']['irregular']:.1f} "
            f"| {e['decode_tokens_per_s']['uniform']:.1f} | {e['decode_latency_ratio']:.3f} "
            f"| {e['decode_ratio_range'][0]:.2f}-{e['decode_ratio_range'][1]:.2f} | {e['prefill_latency_ratio']:.3f} |"
        )
    write_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


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
    """irregular / uniform latency per (backend, variant): decode ms/token, prefill time, TTFT."""
    by = {(r.get("model"), r["backend"], r["variant"]): r for r in rows}
    out = []
    for (model, backend, variant), irr in by.items():
        if model != "irregular":
            continue
        uni = by.get(("uniform", backend, variant))
        if not uni or irr.get("error") or uni.get("error"):
            continue

        def ratio(a, b):
            return a / b if a and b else None

        d_irr, d_uni = (irr.get("decode") or {}).get("tokens_per_s"), (uni.get("decode") or {}).get("tokens_per_s")
        entry = {
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
    lines = ["| backend | variant | " + " | ".join(k.replace("_", " ") for k in keys) + " |"]
    lines.append("|" + "---|" * (len(keys) + 2))
    for e in entries:
        cells = ["-" if e[k] is None else f"{e[k]:.3f}" for k in keys]
        lines.append(f"| {e['backend']} | {e['variant']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Ratios are irregular over uniform latency (1.00 = same; < 1.10 is within 10%).")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
