"""effllm-export's verification step: one torch reference, the prompts and held-out windows shared by
every variant, and each exported file run in the effllm.runtime backend that serves it.

The checks and thresholds are verify.py's; this module only gathers their inputs and runs them.
"""

from __future__ import annotations

import time
from pathlib import Path

from .heldout import HeldoutTokens
from .inputs import Plan, Variant
from .verify import (
    MAX_REL_LOGIT_DIFF,
    PROMPTS,
    TOKENIZER_TEXTS,
    UNQUANTIZED_EVAL_WINDOWS,
    TorchReference,
    VariantReport,
    eval_windows,
    verify_variant,
)


class Verifier:
    """Holds the torch reference, the prompts and the held-out windows shared by all variants."""

    def __init__(self, plan: Plan, model, heldout: HeldoutTokens):
        from tokenizers import Tokenizer

        from .onnx_export import eos_ids

        self.plan = plan
        self.reference = TorchReference(model)
        self.eos = eos_ids(model.config)
        tokenizer = self.tokenizer = Tokenizer.from_file(str(plan.model_dir / "tokenizer.json"))
        self.prompts = {p: tokenizer.encode(p).ids for p in PROMPTS}
        self.prompts = {p: ids for p, ids in self.prompts.items() if ids}
        self.eval_source = heldout.source
        self.windows = eval_windows(heldout.ids, plan.max_seq_len)

    def verify(self, variant: Variant, target: Path) -> VariantReport:
        """Run the variant in ``target`` through its runtime backend and check it against torch."""
        start = time.perf_counter()
        onnx = variant.format == "onnx"
        path = target / {"onnx": "model.onnx", "executorch": "model.pte", "gguf": "model.gguf"}[variant.format]
        report = VariantReport(variant.name, variant.format, variant.quantization, str(path.relative_to(target.parent)))
        genai_greedy = None
        if onnx and variant.quantization == "fp32":
            from effllm.runtime.genai_backend import genai_greedy as search

            def genai_greedy(prompt, new_tokens):
                return search(target, prompt, new_tokens)

        exported = self._load(path, variant.format)
        try:
            if variant.format == "gguf":
                self._gguf_checks(report, exported, variant)
            verify_variant(
                report, self.reference, exported, self.prompts, self.judged_windows(variant), self.plan.max_seq_len,
                self.eos, genai_greedy,
            )  # fmt: skip
        finally:
            exported.close()
        report.verify_seconds = time.perf_counter() - start
        return report

    def judged_windows(self, variant: Variant) -> list[list[int]]:
        """All held-out windows for a quantized variant; the first few for an unquantized one (reported only)."""
        if variant.quantization in MAX_REL_LOGIT_DIFF:
            return self.windows[:UNQUANTIZED_EVAL_WINDOWS]
        return self.windows

    def _gguf_checks(self, report: VariantReport, exported, variant: Variant) -> None:
        """llama.cpp's tokenizer against Hugging Face's, and the tensors its quantizer kept in another type."""
        equal = [exported.tokenize(text) == self.tokenizer.encode(text).ids for text in TOKENIZER_TEXTS]
        report.tokenizer_equal_texts, report.tokenizer_texts = sum(equal), len(equal)
        if variant.quantization not in ("fp32", "f16"):
            from .gguf_quantize import quantization_fallbacks

            report.tensor_fallbacks = quantization_fallbacks(exported.path, variant.quantization)

    @staticmethod
    def _load(path: Path, fmt: str):
        if fmt == "gguf":
            from effllm.runtime.llamacpp_backend import LlamaCppBackend

            # An F32 KV cache: the logit check then measures the weights, not llama.cpp's F16 cache.
            return LlamaCppBackend(path, kv_cache="f32")
        if fmt == "onnx":
            from effllm.runtime.onnx_backend import OnnxRuntimeBackend

            # No busy-waiting between the many tiny decode calls: spinning threads only steal the CPU
            # from everything else on a small machine, for no gain at these sizes.
            return OnnxRuntimeBackend(path, spinning=False)
        from effllm.runtime.executorch_backend import ExecuTorchBackend

        return ExecuTorchBackend(path)

    def summary_fields(self) -> dict:
        return {
            "model_dir": str(self.plan.model_dir.resolve()),
            "max_seq_len": self.plan.max_seq_len,
            "prompts": list(self.prompts),
            "eval_text": self.eval_source,
            "eval_windows": len(self.windows),
        }
