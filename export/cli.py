"""effllm-export: a model directory -> ONNX (+ genai_config) and ExecuTorch .pte, each verified against torch.

Output layout (one self-contained directory per variant, so each can be copied on its own):
    OUT/onnx/               model.onnx, genai_config.json, tokenizer files (runs in onnxruntime-genai as is)
    OUT/onnx-int8/          the same, 8-bit weights (MatMulNBits)
    OUT/onnx-int4/          the same, int4 weight-only (MatMulNBits)
    OUT/executorch/         model.pte (XNNPACK), tokenizer.json (runs in ExecuTorch's TextLLMRunner)
    OUT/executorch-8da4w/   the same, 8-bit dynamic activations / 4-bit weights
    OUT/gguf/               model.gguf (llama.cpp arch "deci", "llama" when every layer has one shape; biases included; f16 or f32), tokenizer.json
                            (runs in llama.cpp, ollama)
    OUT/gguf-q8_0/, gguf-q4_0/, gguf-q4_k_m/   the same, quantized by llama.cpp's own quantizer
    OUT/verify.json, OUT/verify.md   the parity checks (see verify.py)

The formats themselves: docs/formats.md. This module is the command line; inputs.py checks it
(bad input exits with 2 and one line on stderr), pipeline.py exports, verifies (verifier.py) and
publishes (a missed verification threshold exits with 1), heldout.py finds the held-out text.
"""

from __future__ import annotations

import argparse
import sys

from effllm.common.cli_args import CliParser
from effllm.common.errors import run_cli

from .inputs import DEFAULT_MODEL_DIR, DEFAULT_OUT, GROUP_SIZES, resolve_plan
from .pipeline import run_export

PROG = "effllm-export"


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog=PROG,
        description=(
            "Export an EfficientLLM model directory (irregular per-layer shapes allowed) to ONNX "
            "(onnxruntime / onnxruntime-genai), ExecuTorch (.pte for phones) and GGUF (llama.cpp), and verify every "
            "exported file against torch. With no arguments: exports runs/quickstart/model "
            "(effllm-train's quickstart result) to every format in runs/quickstart/export."
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
        nargs="+",
        choices=("onnx", "executorch", "gguf", "all"),
        default=["all"],
        help="which format(s) to export, one or more; all = onnx executorch gguf (default: all). A named format "
        "this model or install cannot take (GGUF without llama.cpp installed, or a model llama.cpp cannot "
        "express) stops the command before anything is written, with exit code 2 and the reason; "
        "--format onnx executorch leaves GGUF out",
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
        choices=("none", "int8", "int4", "8da4w", "q8_0", "q4_0", "q4_k_m", "all"),
        help="quantized variants to add to the fp32 export: int8 (ONNX, weight-only 8-bit MatMulNBits), int4 (ONNX, weight-only "
        "MatMulNBits), 8da4w (ExecuTorch, int8 dynamic activations + int4 weights), q8_0 / q4_0 / q4_k_m (GGUF, "
        "llama.cpp's quantizer); 'all' = every one that applies to --format (default: none, fp32 only)",
    )
    parser.add_argument(
        "--gguf-dtype",
        choices=("f16", "f32"),
        default="f16",
        help="weights of the gguf variant: f16 (half the size; what llama.cpp users run) or f32 (matches torch "
        "to 1e-4); the gguf-q* variants are quantized from it (default: f16)",
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
    def body() -> int:
        args = build_parser().parse_args(argv)
        return run_export(resolve_plan(args))

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
