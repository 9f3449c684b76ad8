"""The verification report: verify.json (for machines) and verify.md (for people), and the table
effllm-export prints."""

from __future__ import annotations

import json
import math
from pathlib import Path

from effllm.common.fileio import write_atomic

from .verify import F16_MAX_REL_LOGIT_DIFF, FP32_MAX_REL_LOGIT_DIFF, GREEDY_TOKENS, QUANTIZED_THRESHOLDS, VariantReport

LEGEND = f"""fp32 variants pass with every logit within {FP32_MAX_REL_LOGIT_DIFF:.0e} x the logits' scale (the largest |logit| torch
computes on the prompts) of torch's (prefill and one decode step per token of a {GREEDY_TOKENS}-token greedy continuation,
every prompt) and identical greedy tokens
(for ONNX also in onnxruntime-genai). Quantized variants pass on held-out text: top-1 agreement
with fp32 torch >= {QUANTIZED_THRESHOLDS["int8"]["min_top1_agreement"]} (int8) / >= {QUANTIZED_THRESHOLDS["int4"]["min_top1_agreement"]} (int4, 8da4w) and a perplexity increase of at
most {QUANTIZED_THRESHOLDS["int8"]["max_ppl_increase"]:.0%} / {QUANTIZED_THRESHOLDS["int4"]["max_ppl_increase"]:.0%}; their greedy and logit columns are for information.
GGUF variants run in llama.cpp (F32 KV cache): gguf with f32 weights is held to the fp32 promise, with f16
weights to {F16_MAX_REL_LOGIT_DIFF:.0e} x the logits' scale and identical greedy tokens; gguf-q8_0 to int8's thresholds, gguf-q4_0 and
gguf-q4_k_m to int4's; every GGUF variant's llama.cpp tokenizer must give the Hugging Face token ids.
"""

def format_table(reports: list[VariantReport]) -> str:
    """A Markdown table, one row per exported variant."""
    header = (
        "| variant | size | export | max abs logit diff | logit scale | greedy = torch | genai = torch | tokenizer = HF "
        "| top-1 agree | ppl torch | ppl | ppl change | result |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in reports:
        genai = "-" if r.genai_greedy_equal_prompts is None else f"{r.genai_greedy_equal_prompts}/{r.prompts}"
        tok = "-" if r.tokenizer_texts is None else f"{r.tokenizer_equal_texts}/{r.tokenizer_texts}"
        lines.append(
            f"| {r.name} | {_size(r.size_bytes)} | {_secs(r.export_seconds)} | {r.max_abs_logit_diff:.2e} | {r.logit_scale:.3g} "
            f"| {r.greedy_equal_prompts}/{r.prompts} | {genai} | {tok} | {_num(r.top1_agreement, '.3f')} "
            f"| {_num(r.ppl_torch, '.2f')} | {_num(r.ppl, '.2f')} | {_pct(r.ppl_increase)} "
            f"| {'pass' if r.passed else 'FAIL: ' + '; '.join(r.failures)} |"
        )
    return "\n".join(lines)


def format_fallbacks(reports: list[VariantReport]) -> str:
    """verify.md's list of the tensors llama.cpp's quantizer kept in another type than the variant's own."""
    rows = [(r.name, f) for r in reports for f in r.tensor_fallbacks or []]
    quantized = [r.name for r in reports if r.tensor_fallbacks is not None]
    if not quantized:
        return ""
    text = (
        "## GGUF tensors in another type\n\nllama.cpp's quantizer stores a tensor in another type when its rows "
        "(input width) are not a multiple of the type's block (32 for q8_0 / q4_0, 256 for the K-quants), and "
        "the K-quant mixes keep some tensors at higher precision by design.\n\n"
    )
    if not rows:
        return text + f"None: every weight of {', '.join(quantized)} is in the variant's own type.\n"
    lines = ["| variant | tensor | type | row length | why |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {f['tensor']} | {f['type']} | {f['row_length']} | {f['reason']} |" for name, f in rows]
    return text + "\n".join(lines) + "\n"


def _size(n):
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def _secs(s):
    return "-" if s is None else f"{s:.1f} s"


def _num(x, fmt):
    return "-" if x is None or math.isnan(x) else format(x, fmt)


def _pct(x):
    return "-" if x is None or math.isnan(x) else f"{100 * x:+.2f}%"


def write_reports(reports: list[VariantReport], out_dir: str | Path, extra: dict | None = None) -> dict:
    """verify.json (for machines) and verify.md (for people) in out_dir, each written atomically."""
    out_dir = Path(out_dir)
    summary = {
        "passed": all(r.passed for r in reports),
        "fp32_max_rel_logit_diff": FP32_MAX_REL_LOGIT_DIFF,
        "f16_max_rel_logit_diff": F16_MAX_REL_LOGIT_DIFF,
        "greedy_tokens": GREEDY_TOKENS,
        "quantized_thresholds": QUANTIZED_THRESHOLDS,
        **(extra or {}),
        "variants": [r.as_dict() for r in reports],
    }
    write_atomic(out_dir / "verify.json", json.dumps(_without_nan(summary), indent=2) + "\n")
    fallbacks = format_fallbacks(reports)
    markdown = "# Export verification\n\n" + format_table(reports) + "\n\n" + LEGEND + ("\n" + fallbacks if fallbacks else "")
    write_atomic(out_dir / "verify.md", markdown)
    return summary


def _without_nan(value):
    """NaN (a metric not measured) becomes null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nan(v) for v in value]
    return value
