"""effllm-export's input checks: the command line -> a Plan (what to export, where), or one EffllmError.

Everything the user can get wrong (the model directory, flags that do not fit together, an
unwritable output) is checked here, before any slow work starts; the message names the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from effllm.runtime.model_files import WEIGHT_FILES, sibling_export

from effllm.common.errors import EffllmError, first_line
from effllm.common.fileio import unwritable_reason

from .heldout import find_train_heldout

DEFAULT_MODEL_DIR = Path("runs/quickstart/model")
DEFAULT_OUT = Path("runs/quickstart/export")
FORMATS = ("onnx", "executorch", "gguf")
# method -> the format it applies to; the gguf ones are llama.cpp's own quantization types
QUANTIZATIONS = {"int8": "onnx", "int4": "onnx", "8da4w": "executorch", "q8_0": "gguf", "q4_0": "gguf", "q4_k_m": "gguf"}
GROUP_SIZES = (32, 64, 128, 256)  # int4 blocks / 8da4w groups: XNNPACK needs multiples of 32
MIN_SEQ_LEN = 16


@dataclass
class Variant:
    name: str  # also the output subdirectory
    format: str
    quantization: str  # "fp32", "f16" (the gguf variant's default weights) or a key of QUANTIZATIONS


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
    gguf_dtype: str = "f16"  # weights of the gguf variant (the quantized ones are made from it)


def resolve_plan(args) -> Plan:
    if args.model_dir is None:
        model_dir = DEFAULT_MODEL_DIR
        if not model_dir.exists():
            raise EffllmError(
                f"no model at {model_dir}; run `effllm-train` first (it writes the quickstart model there) "
                "or give a MODEL_DIR"
            )
        out = Path(args.out) if args.out else DEFAULT_OUT
    else:
        model_dir = Path(args.model_dir)
        out = Path(args.out) if args.out else sibling_export(model_dir)
    config = check_model_dir(model_dir)

    formats = FORMATS if "all" in args.format else tuple(f for f in FORMATS if f in args.format)
    if "gguf" in formats:
        # Refused, not left out: an exit code 0 would tell a script that every format it asked for exists.
        problem = gguf_unavailable(config, model_dir)
        if problem:
            others = " ".join(f for f in formats if f != "gguf")
            remedy = f"to export the rest, leave GGUF out: --format {others}" if others else "export another --format"
            raise EffllmError(f"{problem}; {remedy}")
    gguf_dtype = getattr(args, "gguf_dtype", "f16")
    variants = [Variant(fmt, fmt, "f16" if fmt == "gguf" and gguf_dtype == "f16" else "fp32") for fmt in formats]
    methods = [q for q in args.quantize if q != "none"]
    if "all" in methods:
        methods = [q for q, fmt in QUANTIZATIONS.items() if fmt in formats]
    for method in dict.fromkeys(methods):
        fmt = QUANTIZATIONS[method]
        if fmt not in formats:
            raise EffllmError(
                f"--quantize {method} applies to {fmt}, which --format {' '.join(args.format)} leaves out; "
                f"add {fmt} to --format, or use --format all"
            )
        variants.append(Variant(f"{fmt}-{method}", fmt, method))

    limit = config.max_position_embeddings
    max_seq_len = args.max_seq_len if args.max_seq_len is not None else min(limit, 2048)
    if max_seq_len > limit:
        raise EffllmError(
            f"--max-seq-len {max_seq_len} is beyond what the model supports (max_position_embeddings {limit}); "
            f"use --max-seq-len {limit} or less"
        )
    if max_seq_len < MIN_SEQ_LEN:
        raise EffllmError(f"--max-seq-len {max_seq_len} is too short to be useful; use at least {MIN_SEQ_LEN}")

    eval_text = heldout_bin = None
    if args.eval_text is not None:
        eval_text = Path(args.eval_text)
        if not eval_text.is_file():
            raise EffllmError(f"--eval-text {eval_text} is not a file; give a UTF-8 text file or leave the flag out")
    elif not args.no_verify:
        heldout_bin = find_train_heldout(model_dir, config.vocab_size)
    check_writable(out)
    return Plan(
        model_dir, out, variants, max_seq_len, args.group_size, not args.no_verify, eval_text, heldout_bin, gguf_dtype
    )  # fmt: skip


def gguf_unavailable(config, model_dir: Path) -> str | None:
    """Why this model cannot be exported as GGUF here (llama.cpp missing, or a model it cannot express), or None."""
    import importlib.util

    from .gguf_export import check_gguf_expressible

    if importlib.util.find_spec("llama_cpp") is None:
        return (
            "GGUF export runs llama.cpp (its quantizer and the verification), which is not installed; "
            "pip install -e '.[gguf]' (compiles llama.cpp: about 20 minutes on 2 cores)"
        )
    try:
        check_gguf_expressible(config, model_dir)
    except EffllmError as err:
        return str(err)
    return None


def check_model_dir(model_dir: Path):
    """The model's config, or EffllmError naming what is missing (checked before any slow work starts)."""
    config_path = model_dir / "config.json"
    if not model_dir.is_dir() or not config_path.is_file():
        raise EffllmError(
            f"{model_dir} is not a model directory (no config.json); give a directory written by effllm-train "
            "or model.save_pretrained(), e.g. runs/quickstart/model"
        )
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise EffllmError(
            f"{config_path} is not readable JSON ({err}); re-save the model with save_pretrained()"
        ) from None
    model_type = raw.get("model_type")
    if model_type != "effllm":
        arch = (raw.get("architectures") or [model_type or "unknown"])[0]
        raise EffllmError(
            f"{model_dir} holds a {arch} (model_type {model_type!r}); effllm-export supports EfficientLLM "
            "directories (model_type 'effllm') only; import Llama/Qwen2/Mistral checkpoints with effllm-train "
            "or effllm.model.convert.from_pretrained() and save_pretrained() the result"
        )
    if not any((model_dir / name).is_file() for name in WEIGHT_FILES):
        raise EffllmError(f"{model_dir} has no weights (model.safetensors); save the model with model.save_pretrained()")
    if not (model_dir / "tokenizer.json").is_file():
        raise EffllmError(
            f"{model_dir} has no tokenizer.json, which onnxruntime-genai and the ExecuTorch runner need; "
            "save it there with tokenizer.save_pretrained()"
        )
    import effllm  # noqa: F401  (registers the config class)
    from effllm import EfficientLLMConfig, EfficientLLMConfigError
    from effllm.model.model_dir import check_model_files

    check_model_files(model_dir)  # config types, truncated weights; the code copies are never run

    try:
        config = EfficientLLMConfig.from_pretrained(model_dir)
    except (EfficientLLMConfigError, OSError, ValueError, TypeError, KeyError) as err:
        raise EffllmError(
            f"{config_path} does not describe a valid EfficientLLM ({first_line(err)}); fix or re-save it"
        ) from None
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise EffllmError(
            f"{model_dir} uses {rope_type} RoPE, whose frequencies depend on the input length and cannot be "
            "exported as a fixed graph; re-save the model with default, linear or llama3 RoPE"
        )
    if not config.attention_layer_indices():
        raise EffllmError(
            f"{model_dir} has no attention layer, so there is no KV cache to export; this is not a usable LM"
        )
    return config


def check_writable(out: Path) -> None:
    reason = unwritable_reason(out, "effllm-export")
    if reason:
        raise EffllmError(f"cannot write to output directory {out} ({reason}); choose a writable --out")
