"""effllm-export: a model directory -> ONNX (+ genai_config) and ExecuTorch .pte, each verified against torch.

Output layout (one self-contained directory per variant, so each can be copied on its own):
    OUT/onnx/               model.onnx, genai_config.json, tokenizer files (runs in onnxruntime-genai as is)
    OUT/onnx-int8/          the same, int8 dynamic quantization
    OUT/onnx-int4/          the same, int4 weight-only (MatMulNBits)
    OUT/executorch/         model.pte (XNNPACK), tokenizer.json (runs in ExecuTorch's TextLLMRunner)
    OUT/executorch-8da4w/   the same, 8-bit dynamic activations / 4-bit weights
    OUT/verify.json, OUT/verify.md   the parity checks (see verify.py)

Everything is built and verified in a staging directory inside OUT and moved into place at the
end, so an export that crashes or is interrupted leaves OUT as it was. A variant that fails its
verification thresholds is still published (so it can be inspected), verify.json marks it failed,
and the command exits with 1. Bad input exits with 2 and one line on stderr. verify.json describes
the variants this run wrote (an earlier run's other variants stay, with their own files).

Held-out text for the quantized checks, first found: --eval-text FILE; the held-out split that
effllm-train tokenized beside the model (runs/<name>/data/heldout.bin, never trained on); built-in
Python standard-library docstrings (fine for comparing quantized with fp32 even if seen in training).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from effllm.runtime.generate import quiet_native_output  # one fd-silencing helper for export and runtime

from effllm.fileio import unwritable_reason

DEFAULT_MODEL_DIR = Path("runs/quickstart/model")
DEFAULT_OUT = Path("runs/quickstart/export")
FORMATS = ("onnx", "executorch")
QUANTIZATIONS = {"int8": "onnx", "int4": "onnx", "8da4w": "executorch"}  # method -> the format it applies to
GROUP_SIZES = (32, 64, 128, 256)  # int4 blocks / 8da4w groups: XNNPACK needs multiples of 32
MIN_SEQ_LEN = 16
# effllm-train's held-out split: runs/<name>/data/heldout.bin (flat token ids, dtype in meta.json)
# beside runs/<name>/model; tokenized by the same tokenizer, never trained on.
TRAIN_HELDOUT = ("data/heldout.bin", "data/meta.json")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class BadInput(Exception):
    """Input the user must fix; the message names the problem and the fix (exit code 2)."""


@dataclass
class Variant:
    name: str  # also the output subdirectory
    format: str
    quantization: str  # "fp32" or a key of QUANTIZATIONS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effllm-export",
        description=(
            "Export an EfficientLLM model directory (irregular per-layer shapes allowed) to ONNX "
            "(onnxruntime / onnxruntime-genai) and ExecuTorch (.pte for phones), and verify every "
            "exported file against torch. With no arguments: exports runs/quickstart/model "
            "(effllm-train's quickstart result) to both formats in runs/quickstart/export."
        ),
        epilog=(
            "Exit codes: 0 exported and verified; 1 exported, but a verification threshold was missed "
            "(see verify.json); 2 bad input (one line on stderr says what to fix)."
        ),
    )
    parser.add_argument(
        "model_dir",
        nargs="?",
        default=None,
        metavar="MODEL_DIR",
        help=f"model directory written by effllm-train (config.json, model.safetensors, tokenizer.json); "
        f"default: {DEFAULT_MODEL_DIR}",
    )
    parser.add_argument(
        "--format",
        choices=("onnx", "executorch", "all"),
        default="all",
        help="which format(s) to export (default: all)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help=f"output directory; default: {DEFAULT_OUT} with no MODEL_DIR, else 'export' beside MODEL_DIR "
        "when MODEL_DIR is named 'model' (effllm-train's layout), else MODEL_DIR-export",
    )
    parser.add_argument(
        "--quantize",
        nargs="+",
        default=["none"],
        choices=("none", "int8", "int4", "8da4w", "all"),
        help="quantized variants to add to the fp32 export: int8 (ONNX, dynamic), int4 (ONNX, weight-only "
        "MatMulNBits), 8da4w (ExecuTorch, int8 dynamic activations + int4 weights); 'all' = every one that "
        "applies to --format (default: none, fp32 only)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        choices=GROUP_SIZES,
        default=32,
        help="input channels per int4 scale (ONNX int4 block size and 8da4w group size); 8da4w layers whose "
        "input width is not a multiple of it use int8 per-channel weights instead (default: 32)",
    )
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="longest context (prompt + generated tokens) the exported models serve; sizes the ExecuTorch KV "
        "cache and genai's context_length; at most the model's max_position_embeddings; "
        "default: min(max_position_embeddings, 2048)",
    )
    parser.add_argument(
        "--eval-text",
        default=None,
        metavar="FILE",
        help="held-out text (UTF-8) for the quantized variants' top-1 agreement and perplexity; default: the "
        "held-out split effllm-train wrote beside MODEL_DIR (../data/heldout.bin), else built-in English text "
        "(Python standard-library docstrings, which a model trained on the embedded corpus may have seen: "
        "the perplexity change then still compares quantized with fp32 fairly)",
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the verification against torch (faster; no verify.json)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = resolve_plan(args)
    except BadInput as err:
        print(f"effllm-export: error: {err}", file=sys.stderr)
        return 2
    return run_export(plan)


# ---- input checks -------------------------------------------------------------------------------
@dataclass
class Plan:
    model_dir: Path
    out: Path
    variants: list[Variant]
    max_seq_len: int
    group_size: int
    verify: bool
    eval_text: Path | None  # --eval-text (UTF-8)
    heldout_bin: Path | None  # else effllm-train's held-out token ids, if found


def resolve_plan(args) -> Plan:
    if args.model_dir is None:
        model_dir = DEFAULT_MODEL_DIR
        if not model_dir.exists():
            raise BadInput(
                f"no model at {model_dir}; run `effllm-train` first (it writes the quickstart model there) "
                "or give a MODEL_DIR"
            )
        out = Path(args.out) if args.out else DEFAULT_OUT
    else:
        model_dir = Path(args.model_dir)
        out = Path(args.out) if args.out else default_out(model_dir)
    config = check_model_dir(model_dir)

    formats = FORMATS if args.format == "all" else (args.format,)
    variants = [Variant(fmt, fmt, "fp32") for fmt in formats]
    methods = [q for q in args.quantize if q != "none"]
    if "all" in methods:
        methods = [q for q, fmt in QUANTIZATIONS.items() if fmt in formats]
    for method in dict.fromkeys(methods):
        fmt = QUANTIZATIONS[method]
        if fmt not in formats:
            raise BadInput(
                f"--quantize {method} applies to {fmt}, which --format {args.format} leaves out; add --format {fmt} or all"
            )
        variants.append(Variant(f"{fmt}-{method}", fmt, method))

    limit = config.max_position_embeddings
    max_seq_len = args.max_seq_len if args.max_seq_len is not None else min(limit, 2048)
    if max_seq_len > limit:
        raise BadInput(
            f"--max-seq-len {max_seq_len} is beyond what the model supports (max_position_embeddings {limit}); "
            f"use --max-seq-len {limit} or less"
        )
    if max_seq_len < MIN_SEQ_LEN:
        raise BadInput(f"--max-seq-len {max_seq_len} is too short to be useful; use at least {MIN_SEQ_LEN}")

    eval_text = heldout_bin = None
    if args.eval_text is not None:
        eval_text = Path(args.eval_text)
        if not eval_text.is_file():
            raise BadInput(f"--eval-text {eval_text} is not a file; give a UTF-8 text file or leave the flag out")
    elif not args.no_verify:
        heldout_bin = find_train_heldout(model_dir, config.vocab_size)
    check_writable(out)
    return Plan(model_dir, out, variants, max_seq_len, args.group_size, not args.no_verify, eval_text, heldout_bin)


def default_out(model_dir: Path) -> Path:
    resolved = model_dir.resolve()
    return resolved.parent / "export" if resolved.name == "model" else resolved.with_name(resolved.name + "-export")


def check_model_dir(model_dir: Path):
    """The model's config, or BadInput naming what is missing (checked before any slow work starts)."""
    config_path = model_dir / "config.json"
    if not model_dir.is_dir() or not config_path.is_file():
        raise BadInput(
            f"{model_dir} is not a model directory (no config.json); give a directory written by effllm-train "
            "or model.save_pretrained(), e.g. runs/quickstart/model"
        )
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise BadInput(
            f"{config_path} is not readable JSON ({err}); re-save the model with save_pretrained()"
        ) from None
    model_type = raw.get("model_type")
    if model_type != "effllm":
        arch = (raw.get("architectures") or [model_type or "unknown"])[0]
        raise BadInput(
            f"{model_dir} holds a {arch} (model_type {model_type!r}); effllm-export supports EfficientLLM "
            "directories (model_type 'effllm') only; import Llama/Qwen2/Mistral checkpoints with effllm-train "
            "or effllm.convert.from_pretrained() and save_pretrained() the result"
        )
    if not any((model_dir / name).is_file() for name in WEIGHT_FILES):
        raise BadInput(f"{model_dir} has no weights (model.safetensors); save the model with model.save_pretrained()")
    if not (model_dir / "tokenizer.json").is_file():
        raise BadInput(
            f"{model_dir} has no tokenizer.json, which onnxruntime-genai and the ExecuTorch runner need; "
            "save it there with tokenizer.save_pretrained()"
        )
    import effllm  # noqa: F401  (registers the config class)
    from effllm import EfficientLLMConfig, EfficientLLMConfigError

    try:
        config = EfficientLLMConfig.from_pretrained(model_dir)
    except (EfficientLLMConfigError, OSError, ValueError, TypeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BadInput(f"{config_path} does not describe a valid EfficientLLM ({first}); fix or re-save it") from None
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise BadInput(
            f"{model_dir} uses {rope_type} RoPE, whose frequencies depend on the input length and cannot be "
            "exported as a fixed graph; re-save the model with default, linear or llama3 RoPE"
        )
    if not config.attention_layer_indices():
        raise BadInput(
            f"{model_dir} has no attention layer, so there is no KV cache to export; this is not a usable LM"
        )
    return config


def check_writable(out: Path) -> None:
    reason = unwritable_reason(out, "effllm-export")
    if reason:
        raise BadInput(f"cannot write to output directory {out} ({reason}); choose a writable --out")


def find_train_heldout(model_dir: Path, vocab_size: int) -> Path | None:
    """effllm-train's heldout.bin beside the model, if it is intact and matches the model's vocabulary."""
    tokens, meta = (model_dir.resolve().parent / name for name in TRAIN_HELDOUT)
    try:
        info = json.loads(meta.read_text())
        itemsize = np.dtype(info["dtype"]).itemsize
        intact = tokens.stat().st_size == int(info["heldout_tokens"]) * itemsize
        return tokens if intact and int(info["vocab_size"]) <= vocab_size else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_heldout_tokens(path: Path, limit: int) -> list[int]:
    dtype = json.loads((path.parent / "meta.json").read_text())["dtype"]
    return np.fromfile(path, dtype=dtype, count=limit).astype(np.int64).tolist()


def builtin_eval_text() -> str:
    """English text that ships with Python: standard-library docstrings (the corpus minus pydoc topics)."""
    from effllm.corpus import python_docs_corpus

    topics = len(python_docs_corpus(include_stdlib=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # inspect touching typing.io / typing.re
        docs = python_docs_corpus(include_stdlib=True)
    return "\n\n".join(docs[topics:])


# ---- the export -----------------------------------------------------------------------------------
def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet_libraries(native: bool = False):
    """Keep the exporters' own chatter (torch.onnx's step lines, deprecation warnings) off the terminal.

    native=True also silences C++ code that writes to the process's stdout/stderr directly (the
    ExecuTorch runtime logs CPU probing when it loads); Python errors still surface, after it ends.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        if native:
            stack.enter_context(quiet_native_output())
        yield


def run_export(plan: Plan) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from effllm import EfficientLLMForCausalLM
    from effllm.params import architecture_summary

    from .executorch_export import export_executorch
    from .onnx_export import export_onnx
    from .quantize import quantize_onnx_dir

    say(f"effllm-export: {plan.model_dir} -> {plan.out} ({', '.join(v.name for v in plan.variants)})")
    model = EfficientLLMForCausalLM.from_pretrained(plan.model_dir, dtype="float32").eval().requires_grad_(False)
    say(architecture_summary(model.config))

    staging = plan.out / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    steps = len(plan.variants) * (2 if plan.verify else 1)
    step = 0
    reports = []
    try:
        verifier = Verifier(plan, model) if plan.verify else None
        for variant in plan.variants:
            step += 1
            say(f"[{step}/{steps}] export {variant.name}{_slow_hint(variant)} ...")
            start = time.perf_counter()
            target = staging / variant.name
            with quiet_libraries():
                if variant.format == "onnx" and variant.quantization == "fp32":
                    export_onnx(model, target, plan.max_seq_len, model_dir=plan.model_dir)
                elif variant.format == "onnx":
                    quantize_onnx_dir(staging / "onnx", target, variant.quantization, plan.group_size)
                else:
                    quantize = None if variant.quantization == "fp32" else variant.quantization
                    export_executorch(model, target, plan.max_seq_len, quantize, plan.group_size, plan.model_dir)
            seconds = time.perf_counter() - start
            size = model_file_bytes(target)
            say(f"      done in {seconds:.1f} s, {size / 2**20:.2f} MiB")
            if verifier is not None:
                step += 1
                say(f"[{step}/{steps}] verify {variant.name} against torch ...")
                report = verifier.verify(variant, target)
                report.export_seconds, report.size_bytes = seconds, size
                reports.append(report)
                say(f"      {'passed' if report.passed else 'FAILED: ' + '; '.join(report.failures)}")
        if verifier is not None:
            from .verify import write_reports

            write_reports(reports, staging, verifier.summary_fields())
        publish(staging, plan.out, [v.name for v in plan.variants], plan.verify)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    if not plan.verify:
        say(f"exported to {plan.out} (verification skipped: --no-verify)")
        return 0
    from .verify import format_table

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
        " (XNNPACK lowering: the slow step, about a minute for a small model)" if variant.format == "executorch" else ""
    )


def model_file_bytes(variant_dir: Path) -> int:
    """Bytes of the model itself (model.onnx + external data, or model.pte), tokenizer files excluded."""
    return sum(p.stat().st_size for p in variant_dir.iterdir() if p.name.startswith(("model.onnx", "model.pte")))


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


class Verifier:
    """Holds the torch reference, the prompts and the held-out windows shared by all variants."""

    def __init__(self, plan: Plan, model):
        from tokenizers import Tokenizer

        from .onnx_export import eos_ids
        from .verify import EVAL_WINDOW, EVAL_WINDOWS, PROMPTS, TorchModel, eval_windows

        self.plan = plan
        self.reference = TorchModel(model)
        self.config = model.config
        self.eos = eos_ids(model.config)
        tokenizer = Tokenizer.from_file(str(plan.model_dir / "tokenizer.json"))
        self.prompts = {p: tokenizer.encode(p).ids for p in PROMPTS}
        self.prompts = {p: ids for p, ids in self.prompts.items() if ids}
        if plan.heldout_bin is not None:
            self.eval_source = str(plan.heldout_bin.resolve())
            ids = read_heldout_tokens(plan.heldout_bin, EVAL_WINDOWS * EVAL_WINDOW)
        elif plan.eval_text is not None:
            self.eval_source = str(plan.eval_text.resolve())
            ids = tokenizer.encode(plan.eval_text.read_text(errors="replace")).ids
        else:
            self.eval_source = "built-in: Python standard-library docstrings"
            ids = tokenizer.encode(builtin_eval_text()).ids
        self.windows = eval_windows(ids, plan.max_seq_len)

    def verify(self, variant: Variant, target: Path):
        from .verify import ExecuTorchModel, OnnxRuntimeModel, VariantReport, verify_variant

        start = time.perf_counter()
        onnx = variant.format == "onnx"
        path = target / ("model.onnx" if onnx else "model.pte")
        report = VariantReport(variant.name, variant.format, variant.quantization, str(path.relative_to(target.parent)))
        genai_dir = target if onnx and variant.quantization == "fp32" else None
        with quiet_libraries(native=not onnx):
            exported = OnnxRuntimeModel(path, self.config) if onnx else ExecuTorchModel(path)
            verify_variant(
                report, self.reference, exported, self.prompts, self.windows, self.plan.max_seq_len, self.eos, genai_dir
            )
        report.verify_seconds = time.perf_counter() - start
        return report

    def summary_fields(self) -> dict:
        return {
            "model_dir": str(self.plan.model_dir.resolve()),
            "max_seq_len": self.plan.max_seq_len,
            "prompts": list(self.prompts),
            "eval_text": self.eval_source,
            "eval_windows": len(self.windows),
        }


if __name__ == "__main__":
    sys.exit(main())
