"""effllm-generate and effllm-bench.

    effllm-generate [--backend B] [MODEL [PROMPT]]   stream a continuation to the terminal
    effllm-bench [MODEL]                             laptop benchmark -> bench.json / bench.md / bench.png
    effllm-bench --target android --runner llama_main [--serial ID] [MODEL]

Bad input (a missing model, an option a backend lacks, no adb or phone) is an EffllmError: run_cli
prints it as one line on stderr and exits with 2, without a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from effllm.common.cli_args import CliParser, nonnegative_int, positive_int
from effllm.common.errors import EXIT_INTERRUPTED, EffllmError, first_line, run_cli

DEFAULT_PROMPT = "The return statement"
EXIT_RUNTIME_FAILED = 1


# ---- effllm-generate --------------------------------------------------------------------------------
def generate_parser() -> CliParser:
    from .model_files import BACKENDS, DEFAULT_EXPORT, DEFAULT_MODEL

    parser = CliParser(
        prog="effllm-generate",
        description=(
            "Generate text from an EfficientLLM model with one of several runtimes and stream it to the "
            "terminal. Every backend shares the same sampling (greedy by default). With no arguments: the "
            f"quickstart's export ({DEFAULT_EXPORT}, else the model {DEFAULT_MODEL}) and a default prompt."
        ),
        epilog=(
            "Backends: torch (eager PyTorch on the model directory), onnxruntime (model.onnx in effllm's own "
            "numpy loop; no torch needed), genai (the ONNX directory in onnxruntime-genai), executorch "
            "(model.pte in the ExecuTorch runtime, XNNPACK), executorch-runner (model.pte in ExecuTorch's C++ "
            "LLM runner, the code Android's LlmModule runs; greedy or temperature only), llamacpp (model.gguf in "
            "llama.cpp, F16 KV cache as llama.cpp's users run it). "
            "The continuation goes to stdout, a one-line speed summary to stderr. Exit codes: 0 done; "
            "2 bad input (one line on stderr says what to fix); 1 the runtime failed."
        ),
    )
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="a model directory (effllm-train), an export directory (effllm-export), one of its variant "
        "directories, or a model file: model.onnx, model.pte, or any .gguf (one effllm did not write runs with the "
        "tokenizer inside it, e.g. SmolLM2-135M-Instruct.Q4_1.gguf); a model directory and its export find each other "
        f"(runs/x/model <-> runs/x/export). Default: {DEFAULT_EXPORT}, else {DEFAULT_MODEL}",
    )
    parser.add_argument(
        "prompt", nargs="?", default=None, metavar="PROMPT", help=f"the text to continue (default: {DEFAULT_PROMPT!r})"
    )
    parser.add_argument(
        "--backend",
        choices=("auto", *BACKENDS),
        default="auto",
        help="the runtime; auto = onnxruntime if MODEL has an ONNX export, else executorch, else llamacpp (a GGUF), "
        "else torch",
    )
    parser.add_argument(
        "--variant",
        default=None,
        help="which exported variant to run (a directory name of the export: onnx, onnx-int8, onnx-int4, "
        "executorch, executorch-8da4w, gguf, gguf-q8_0, gguf-q4_0, gguf-q4_k_m); default: the backend's fp32 one",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=nonnegative_int,
        default=128,
        help="most tokens to generate (default 128; fewer when the model's max sequence length is reached)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature; 0 = greedy, always the most likely token (default 0)",
    )
    parser.add_argument(
        "--top-k", type=nonnegative_int, default=0, help="sample among the k most likely tokens only; 0 = all (default 0)"
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="sample among the most likely tokens whose probabilities add up to p (nucleus); 1 = all (default 1)",
    )
    parser.add_argument(
        "--seed",
        type=nonnegative_int,
        default=None,
        help="random seed for sampling: the same seed, options and model give the same text on every backend "
        "(default: a different draw each run)",
    )
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="CPU threads for the runtime (default: the runtime's own)"
    )
    parser.add_argument(
        "--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token (fixed lengths)"
    )
    parser.add_argument("--no-echo", action="store_true", help="print only the continuation, not the prompt before it")
    parser.add_argument("--quiet", action="store_true", help="no speed summary on stderr")
    return parser


def _stdout_for_streaming():
    """A text stream on a duplicate of file descriptor 1, so that muting C++ output on fd 1 spares it."""
    if sys.stdout is sys.__stdout__ and sys.stdout is not None:
        try:
            sys.stdout.flush()
            return os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", errors="replace"), True
        except (OSError, ValueError, AttributeError):
            pass
    return sys.stdout, False


def generate_main(argv: list[str] | None = None) -> int:
    prog = "effllm-generate"
    args = generate_parser().parse_args(argv)
    return run_cli(prog, lambda: _generate(prog, args))


def _generate(prog: str, args) -> int:
    from .generate import load_generator
    from .model_files import DEFAULT_EXPORT
    from .sampling import SamplingConfig

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
    if args.backend == "executorch-runner":  # options it refuses are bad input: say so before loading the runtime
        from .executorch_backend import RunnerGenerator

        RunnerGenerator.check_options(prompt, sampling, stop_at_eos=not args.ignore_eos)
    try:
        generator = load_generator(args.model, args.backend, args.variant, args.threads)
    except EffllmError:
        raise
    except Exception as err:  # a file the runtime cannot read is bad input too: say which and why
        where = args.model or DEFAULT_EXPORT
        raise EffllmError(f"cannot load {where} with --backend {args.backend}: {first_line(err)[:300]}") from None

    out, owned = _stdout_for_streaming()
    try:
        if not args.no_echo:
            out.write(prompt)
            out.flush()
        for piece in generator.stream(prompt, args.max_new_tokens, sampling, stop_at_eos=not args.ignore_eos):
            out.write(piece)
            out.flush()
    except EffllmError:
        raise
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as err:
        print(f"{prog}: error: {generator.name} failed while generating: {first_line(err)[:300]}", file=sys.stderr)
        return EXIT_RUNTIME_FAILED
    finally:
        out.write("\n")  # end the streamed line, whatever stopped it
        out.flush()
        if owned:
            out.close()
    if not args.quiet:
        print(generator.stats.summary(), file=sys.stderr)
    return 0


# ---- effllm-bench -----------------------------------------------------------------------------------
def bench_parser() -> CliParser:
    from .bench_targets import BENCH_BACKENDS, DEFAULT_NEW_TOKENS, DEFAULT_PROMPT_LENGTHS
    from .model_files import DEFAULT_EXPORT, DEFAULT_MODEL

    parser = CliParser(
        prog="effllm-bench",
        description=(
            "Benchmark every backend on every exported variant of a model: load time, time to first token, "
            "prefill tokens/s, decode tokens/s, peak memory, file size, and decode speed against the memory-"
            "bandwidth roofline. Writes bench.json (machines), bench.md and bench.png (people). With no "
            f"arguments: whatever the quickstart's export holds ({DEFAULT_EXPORT}, plus the torch model "
            f"{DEFAULT_MODEL} beside it). --target android runs ExecuTorch's llama runner on a phone over adb."
        ),
        epilog=(
            "Every (backend, variant) runs in its own process (its own peak memory and threads); numbers are "
            "medians over --repeats runs after --warmup runs. Speeds are not comparable across machines under "
            "different load: bench.json records the load average before and after. Exit codes: 0 done; 1 done, "
            "but some (backend, variant) failed (marked in the report, reason on stderr); 2 bad input, or no adb / "
            "no device for --target android."
        ),
    )
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL",
        help=f"an export directory, a model directory, a variant directory, a run directory or a model file "
        f"(any .gguf included); default: "
        f"{DEFAULT_EXPORT}, else {DEFAULT_MODEL}",
    )
    parser.add_argument(
        "--target",
        choices=("cpu", "android"),
        default="cpu",
        help="cpu: this machine (default); android: a phone over adb, with --runner",
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=BENCH_BACKENDS,
        default=None,
        metavar="B",
        help=f"backends to run (default: all that MODEL has files for: {', '.join(BENCH_BACKENDS)})",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="V",
        help="exported variants to run, by directory name (onnx, onnx-int8, onnx-int4, executorch, "
        "executorch-8da4w, gguf, gguf-q8_0, gguf-q4_0, gguf-q4_k_m; 'model' for the torch model); default: all",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help=f"CPU threads for every runtime (default: all logical CPUs, here {os.cpu_count()}); on android, "
        "the runner's --cpu_threads (default: its own choice of performance cores)",
    )
    parser.add_argument(
        "--prompt-lengths",
        nargs="+",
        type=positive_int,
        default=list(DEFAULT_PROMPT_LENGTHS),
        metavar="N",
        help="prompt lengths in tokens for prefill speed; the first also serves TTFT and decode "
        f"(default: {' '.join(map(str, DEFAULT_PROMPT_LENGTHS))}); lengths beyond the model's max sequence "
        "length are skipped",
    )
    parser.add_argument(
        "--new-tokens",
        type=positive_int,
        default=DEFAULT_NEW_TOKENS,
        help=f"tokens generated for the decode speed (default {DEFAULT_NEW_TOKENS})",
    )
    parser.add_argument(
        "--warmup", type=nonnegative_int, default=1, help="unmeasured runs before the measured ones (default 1)"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=3, help="measured runs; the median is reported (default 3)"
    )
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the random prompt token ids (default 0)")
    parser.add_argument(
        "--out",
        default=None,
        help="directory for bench.json, bench.md, bench.png (android: bench-android.*); default: 'bench' "
        "beside an export/ or model/ directory (runs/quickstart/bench), else MODEL-bench",
    )
    parser.add_argument(
        "--timeout", type=positive_int, default=3600, help="seconds one (backend, variant) may take (default 3600)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    android = parser.add_argument_group("android (--target android)")
    android.add_argument("--serial", default=None, help="the device's serial (adb devices); needed with several")
    android.add_argument(
        "--runner",
        default=None,
        metavar="PATH",
        help="ExecuTorch's llama_main built for arm64-v8a (build steps: android_demo/README.md)",
    )
    android.add_argument(
        "--adb", default=None, metavar="PATH", help="the adb binary (default: $ADB, PATH, $ANDROID_HOME)"
    )
    return parser


def bench_main(argv: list[str] | None = None) -> int:
    prog = "effllm-bench"
    args = bench_parser().parse_args(argv)
    return run_cli(prog, lambda: _bench(prog, args))


def _bench(prog: str, args) -> int:
    from .bench_report import markdown_table, write_report
    from .bench_targets import BenchSettings, plan_targets
    from .model_files import default_model

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = args.threads if args.threads is not None else (os.cpu_count() if args.target == "cpu" else None)
    settings = BenchSettings(
        threads=threads,
        prompt_lengths=tuple(args.prompt_lengths),
        new_tokens=args.new_tokens,
        warmup=args.warmup,
        repeats=args.repeats,
        seed=args.seed,
        timeout_s=args.timeout,
    )
    model = Path(args.model) if args.model is not None else default_model()
    out = Path(args.out) if args.out else default_out(model)
    if args.target == "android":
        from .android import run_android_bench
        from .bench_report import android_report
        from .bench_targets import android_variants

        raw = run_android_bench(
            android_variants(model, args.variants),
            args.runner,
            serial=args.serial,
            adb=args.adb,
            threads=args.threads,
            prompt_lengths=settings.prompt_lengths,
            new_tokens=settings.new_tokens,
            warmup=settings.warmup,
            repeats=settings.repeats,
        )
        report, stem = android_report(model, raw, settings), "bench-android"
    else:
        from .bench import run_bench

        plan_targets(model, args.backends, args.variants)  # bad input fails here, before any slow work
        _check_writable(out)
        report, stem = run_bench(model, settings, args.backends, args.variants, progress=not args.no_progress), "bench"
    paths = write_report(report, out, stem=stem)
    print(markdown_table(report))
    errors = [r for r in report["results"] if r.get("error")]
    for r in errors:
        print(f"{prog}: {r['backend']} / {r['variant']} failed: {r['error']}", file=sys.stderr)
    print(f"{prog}: wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return EXIT_RUNTIME_FAILED if errors else 0


def default_out(model: Path) -> Path:
    """Where effllm-bench writes by default: 'bench' beside an export/ or model/ directory, else MODEL-bench."""
    resolved = model.resolve()
    if resolved.is_file():
        resolved = resolved.parent
    if resolved.name in ("export", "model"):
        return resolved.parent / "bench"
    return resolved.with_name(resolved.name + "-bench")


def _check_writable(out: Path) -> None:
    from effllm.common.fileio import unwritable_reason

    reason = unwritable_reason(out, "effllm-bench")
    if reason:
        raise EffllmError(f"cannot write to {out} ({reason}); choose a writable --out")


if __name__ == "__main__":
    sys.exit(generate_main())
