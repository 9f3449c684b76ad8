"""Irregular vs uniform latency, paired: the models loaded into one process per (backend, variant) and timed
alternately, so that load from other processes hits them alike (bench/runtime_speed.py --paired N).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from runtime_models import MODEL_SHAPES

COMPARED = ("irregular", "irregular-g32")  # each set against "uniform"

PAIRED_BOOT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from runtime_paired import paired_worker
print(json.dumps(paired_worker(json.loads(sys.stdin.read()))))
"""


def paired_worker(spec: dict) -> dict:
    """The models in this process, timed in turn; the order reverses every round (a, b, c, c, b, a, ...).

    spec["backend"] runs every path, unless spec["backends"] names another for some of them.
    """
    import numpy as np
    from effllm.runtime.generate import load_backend
    from effllm.runtime.native import quiet_native_output

    with quiet_native_output():
        models = {
            name: load_backend(spec.get("backends", {}).get(name, spec["backend"]), path, spec["threads"])
            for name, path in spec["paths"].items()
        }
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
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            times[f"decode_{name}"].append(decode(models[name]))
            times[f"prefill_{name}"].append(prefill(models[name]))
    return times


DECODE_PROMPT = 128
DECODE_TOKENS = 64


def decode_spec(paths: dict, backends: dict, threads: int, rounds: int) -> dict:
    """paired_worker's spec for decode alone ({name: path}, {name: backend}): DECODE_TOKENS tokens after a
    DECODE_PROMPT-token prompt, per file in turn, ``rounds`` times."""
    return dict(
        paths=paths,
        backend=next(iter(backends.values())),
        backends=backends,
        threads=threads,
        prompt=DECODE_PROMPT,
        long_prompt=1,  # the worker also times a prefill; a 1-token one keeps it out of the way
        new_tokens=DECODE_TOKENS,
        repeats=rounds,
    )


def add_decode_arguments(parser, default_out: Path) -> None:
    """The options every decode comparison takes: --rounds, --threads, --out."""
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(default_out), help="output path without extension")


def ratios(times: dict, kind: str, name: str) -> dict:
    """``name`` over uniform for one kind of timing: the median of the per-round ratios, and their range."""
    pairs = [a / b for a, b in zip(times[f"{kind}_{name}"], times[f"{kind}_uniform"])]
    return {"median": statistics.median(pairs), "range": [min(pairs), max(pairs)]}


def paired(exports: dict, settings, args) -> int:
    """Latency of each irregular model over the uniform one per (backend, variant), timed in one process in turn."""
    import subprocess

    from effllm.runtime.bench_targets import BENCH_BACKENDS
    from effllm.runtime.machine import load_average, machine_info
    from effllm.runtime.model_files import FORMAT_OF_BACKEND, find_model_files

    from effllm.common.fileio import write_atomic

    names = [n for n in (*COMPARED, "uniform") if n in exports]
    files = {name: find_model_files(exports[name]) for name in names}
    load_start = load_average()
    results = []
    for backend in args.backends or BENCH_BACKENDS:
        fmt = FORMAT_OF_BACKEND[backend]
        variants = ["model"] if fmt == "hf" else [n for n, (f, _) in files["uniform"].variants.items() if f == fmt]
        for variant in variants:
            if args.variants and variant not in args.variants:
                continue
            paths = {}
            for name, found in files.items():
                if fmt == "hf":
                    paths[name] = str(found.hf)
                elif variant in found.variants:
                    vdir = found.variants[variant][1]
                    paths[name] = str(vdir / "model.pte") if fmt == "pte" else str(vdir)
            spec = dict(
                paths=paths,
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
            entry = {"backend": backend, "variant": variant, "times_s": times, "ratios": {}}
            for name in paths:
                if name != "uniform":
                    entry["ratios"][name] = {kind: ratios(times, kind, name) for kind in ("decode", "prefill")}
            entry["decode_tokens_per_s"] = {
                n: settings.new_tokens / statistics.median(times[f"decode_{n}"]) for n in paths
            }
            results.append(entry)
            said = ", ".join(f"{n}/uniform {r['decode']['median']:.3f}" for n, r in entry["ratios"].items())
            print(f"{backend:11s} {variant:16s} decode {said}", file=sys.stderr)
    report = {
        "machine": machine_info(settings.threads)
        | {"load_average_start": load_start, "load_average_end": load_average()},
        "settings": {
            "threads": settings.threads,
            "prompt_tokens": settings.prompt_lengths[0],
            "prefill_tokens": settings.prompt_lengths[-1],
            "new_tokens": settings.new_tokens,
            "rounds": args.paired,
        },
        "shapes": {name: MODEL_SHAPES[name]() for name in names},
        "results": results,
    }
    out = Path(args.out + "_paired")
    write_atomic(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), paired_markdown(report, load_start))
    print(paired_markdown(report, load_start))
    return 0


def paired_markdown(report: dict, load_start) -> str:
    settings = report["settings"]
    lines = [
        "# Irregular vs uniform models, same parameter count (95.2M), timed in one process, in turn",
        "",
        f"Machine: {report['machine']['cpu']}, {settings['threads']} threads; load average "
        f"{load_start} at start, {report['machine']['load_average_end']} at end. Each row: the models loaded in "
        f"one process, {settings['rounds']} rounds of (decode {settings['new_tokens']} tokens after a "
        f"{settings['prompt_tokens']}-token prompt, prefill {settings['prefill_tokens']} tokens) in turn, the order "
        "reversed every round; a ratio is the median over rounds of the irregular model's time / the uniform one's "
        "(1.00 = same, < 1.10 = within 10%). irregular: FFN widths as pruning leaves them; irregular-g32: the same "
        "layers with every width a multiple of 32 (`effllm-train --granularity 32`).",
        "",
        "| backend | variant | model | decode tok/s | uniform decode tok/s | decode latency ratio | ratio range "
        "| prefill latency ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in report["results"]:
        for name, r in e["ratios"].items():
            lines.append(
                f"| {e['backend']} | {e['variant']} | {name} | {e['decode_tokens_per_s'][name]:.1f} "
                f"| {e['decode_tokens_per_s']['uniform']:.1f} | {r['decode']['median']:.3f} "
                f"| {r['decode']['range'][0]:.2f}-{r['decode']['range'][1]:.2f} | {r['prefill']['median']:.3f} |"
            )
    return "\n".join(lines) + "\n"
