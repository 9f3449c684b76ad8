"""Parity checks: the same token ids through torch and through an exported model.

Both sides are effllm.runtime backends (forward_all: every position's logits): the in-memory model
in the torch backend is the reference, and the exported file runs in the onnxruntime or ExecuTorch
backend, as effllm-generate would run it. verify_report.py writes the results.

fp32 variants must reproduce torch: for every prompt, prefill plus one decode step per token of
torch's greedy continuation (GREEDY_TOKENS long), every logit within FP32_MAX_REL_LOGIT_DIFF times the
logits' scale, and the exported model's own greedy choice equal to torch's at every step. Feeding torch's tokens
(teacher forcing) and checking the argmax at every step is equivalent to letting the exported
model generate on its own: the two sequences agree exactly when every argmax agrees. For ONNX the
directory is also run in onnxruntime-genai, whose greedy tokens must equal torch's.

The logits' scale is the largest |logit| torch computes on the prompts. A tolerance in absolute units
cannot serve both kinds of model: the flat logits of a small model trained on a few million tokens stay
within a few units, a real pretrained model's reach 20-40, and float rounding grows with them (the same
exporter moves a real SmolLM2's logits by 1.1e-4 to 1.5e-4, top-1 1.000, where toy models show 1e-5).
fp32 allows 1e-5 of the scale: summation order and fused kernels differ by a few 1e-7 per operation, so
real models land at 1.4e-6 to 2.6e-6 of it (SmolLM2, ONNX and .pte), while a weight changed by 0.02 moves logits by far more (tests).

Quantized variants cannot reproduce torch bit for bit; they are judged on held-out text:
top-1 agreement (the fraction of positions where the quantized model's argmax equals fp32
torch's) and the relative perplexity increase, on up to EVAL_WINDOWS windows (8,192 tokens: top-1's
standard error ~0.25%). The thresholds guard against broken exports, not the accuracy effllm reaches (on the
0.7-pruned SmolLM2-135M: int8 0.955 / +0.6%, int4 0.881 / +3.3%, 8da4w 0.862 / +4.3%, q4_0 0.867 / +4.3%,
q4_k_m 0.922 / +1.8%). The measurements below are the older ones they were set by (1,024 tokens, before
GPTQ). Thresholds (QUANTIZED_THRESHOLDS) and why:
    int8 (8-bit weights in blocks of 32): top-1 >= 0.93, perplexity +3% at most. 8-bit blocks lose
        ~4e-3 of relative precision per weight, and the kernels quantize activations to int8 blocks
        too; on SmolLM2-135M (held-out English, 1,024 tokens) onnx-int8 keeps top-1 0.950 and
        perplexity +0.4%, llama.cpp's q8_0 0.957 and -0.1% (the same scheme). Top-1 over 1,024 tokens
        has a standard error of ~0.7%, so 0.93 leaves room for sampling while a broken 8-bit export
        (0.55 with one int8 scale per activation tensor) fails; +3% tolerates the hypersensitive
        perplexity of a barely trained or cut model (+1.8% on the tests' 4-layer cut of SmolLM2).
    int4 / 8da4w (4-bit weights, groups of 32): top-1 >= 0.65, perplexity +25% at most. 4-bit
        weights are ~16x coarser, and a real small model loses more at 4 bits than the few percent
        published for 1B+ models. On SmolLM2-135M (held-out English, 1,024 tokens): onnx-int4 top-1
        0.751 and +10.8% perplexity; llama.cpp with effllm's importance matrix q4_k_m 0.866 / +7.8%,
        q4_0 0.731 / +9.8%, without it q4_0 0.659 / +24.4%. On natural text many positions are
        near-ties between plausible tokens, so a working 4-bit export changes a quarter of the argmax
        choices; 0.65 and +25% still fail a broken one (a weight layout or scale bug moves top-1
        below 0.3 and perplexity by multiples), where the former 0.80 failed llama.cpp's own q4_0.
    q8_0 (GGUF, llama.cpp's 8-bit blocks of 32) is held to int8's thresholds, q4_0 and q4_k_m (4-bit
        blocks) to int4's: the same precision classes, so the same promises.

GGUF variants run in llama.cpp with an F32 KV cache, so the logit check sees the weights only (llama.cpp's
default F16 cache alone moves logits by ~2e-4 on the test models). f32 weights are held to fp32's limit
(measured: 4e-7 on the test models). f16 weights to F16_MAX_REL_LOGIT_DIFF = 4e-3 of the scale: f16 keeps 11
significant bits (relative rounding 2^-11 = 4.9e-4 per weight), and the rounding of many weights adds up: a
real SmolLM2 at f16 moved logits by 0.7e-3 to 1.2e-3 of their scale, while a structural bug still fails it (a dropped
attention output moved logits by 0.58 on a toy model with logits of a few units).
Subtler bugs (q/k rows left in rotate_half order: 6.5e-3 on a random test model) only the f32 check sees:
the tests export f32 for that reason, and --gguf-dtype f32 gives any model the tight check.
llama.cpp's tokenizer must give the Hugging Face tokenizer's ids on TOKENIZER_TEXTS (every prompt, digits,
whitespace runs, punctuation, non-ASCII text).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from effllm.runtime.backend import Backend
from effllm.runtime.torch_backend import TorchBackend

GREEDY_TOKENS = 32
# Unquantized variants: the largest logit difference, relative to the logits' scale (the largest |logit|
# torch computes on the prompts; see the module docstring).
FP32_MAX_REL_LOGIT_DIFF = 1e-5
F16_MAX_REL_LOGIT_DIFF = 4e-3
MAX_REL_LOGIT_DIFF = {"fp32": FP32_MAX_REL_LOGIT_DIFF, "f16": F16_MAX_REL_LOGIT_DIFF}


def max_logit_diff(quantization: str, reference_logits) -> float:
    """The largest logit difference an unquantized variant may show against these torch logits."""
    return MAX_REL_LOGIT_DIFF[quantization] * float(np.abs(reference_logits).max())


QUANTIZED_THRESHOLDS = {
    "int8": {"min_top1_agreement": 0.93, "max_ppl_increase": 0.03},
    "int4": {"min_top1_agreement": 0.65, "max_ppl_increase": 0.25},
    "8da4w": {"min_top1_agreement": 0.65, "max_ppl_increase": 0.25},
}
QUANTIZED_THRESHOLDS.update(
    {"q8_0": QUANTIZED_THRESHOLDS["int8"], "q4_0": QUANTIZED_THRESHOLDS["int4"], "q4_k_m": QUANTIZED_THRESHOLDS["int4"]}
)
EVAL_WINDOW = 128  # tokens per held-out window (capped at max_seq_len - 1)
# Quantized variants are judged on 8,192 tokens: on 1,024 the 0.7-pruned SmolLM2's onnx-int8 read top-1
# 0.937 / +0.94% ppl and llama.cpp's q8_0 0.943 / +1.27%, on 8,192 0.954 / +0.56% and 0.953 / +0.45%
# (top-1's standard error falls from ~0.7% to ~0.25%, so limits near 0.95 can be told apart).
EVAL_WINDOWS = 64
# Unquantized variants are held to the logits on the prompts; their perplexity on the first 8 windows is
# reported only (ExecuTorch's per-token forward_all makes 8,192 tokens cost minutes there).
UNQUANTIZED_EVAL_WINDOWS = 8
# the quantizers' E[x x^T] (weight_quant.input_gram): 8,192 tokens. GPTQ needs more text than the search: on
# dithered SmolLM2-135M int4 cost +2.5% ppl calibrated on 2,048 tokens, +1.7% on 8,192; on its 0.7-pruned
# model 8da4w (v_proj, up_proj at int8) +5.0% on 4,096, +3.8% on 8,192
CALIBRATION_WINDOWS = 64
PROMPTS = (
    "The return statement",
    "A list comprehension consists of",
    "def fibonacci(n):\n",
    "The following example shows how",
)
TOKENIZER_TEXTS = PROMPTS + (
    "Hello world! This is a test.",
    "The quick brown fox jumps over the lazy dog, 1234567 times.",
    "  two  spaces,\nnew line\tand tab; it's  (parens) & symbols: $5.99 -- ok?",
    "naïve café — non-ASCII bytes 日本語",
)


# ---- the reference ------------------------------------------------------------------------------
class TorchReference:
    """The fp32 model in the runtime's torch backend: logits of a whole sequence, and greedy continuations
    (computed once per prompt: every variant is checked against the same ones)."""

    def __init__(self, model):
        self.backend = TorchBackend.from_model(model)
        self._greedy: dict[tuple, list[int]] = {}
        self._windows: dict[tuple, tuple[np.ndarray, float]] = {}

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.backend.forward_all(ids, 0)

    def window_stats(self, window: list[int]) -> tuple[np.ndarray, float]:
        """(argmax at every position, NLL of the window's own next tokens), computed once per window: every
        variant is judged on the same windows, and torch's forward was half of each variant's judging."""
        key = tuple(window)
        if key not in self._windows:
            logits = self.logits(window)
            self._windows[key] = (logits.argmax(-1), _nll(logits[:-1], np.array(window[1:])))
        return self._windows[key]

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        """Greedy continuation through the KV cache; EOS does not stop it (fixed length)."""
        key = (tuple(prompt), new_tokens)
        if key not in self._greedy:
            tokens = [int(self.backend.forward(prompt, 0).argmax())]
            while len(tokens) < new_tokens:
                tokens.append(int(self.backend.forward(tokens[-1:], len(prompt) + len(tokens) - 1).argmax()))
            self._greedy[key] = tokens
        return list(self._greedy[key])


def before_eos(tokens: list[int], eos: list[int]) -> list[int]:
    """The tokens before the first EOS: what genai and TextLLMRunner return (they stop at EOS, without it)."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


# ---- the checks ---------------------------------------------------------------------------------
@dataclass
class PromptCheck:
    prompt: str
    prompt_tokens: int
    max_abs_logit_diff: float
    logit_scale: float  # the largest |logit| torch computes on this prompt and its continuation
    greedy_equal: bool
    first_greedy_mismatch: int | None  # index into the continuation, None when equal
    genai_greedy_equal: bool | None = None


@dataclass
class VariantReport:
    name: str
    format: str  # "onnx" | "executorch" | "gguf"
    quantization: str  # "fp32" | "f16" | a key of QUANTIZED_THRESHOLDS
    path: str
    max_abs_logit_diff: float = math.nan
    logit_scale: float = math.nan
    max_rel_logit_diff: float = math.nan  # max_abs_logit_diff / logit_scale
    greedy_equal_prompts: int = 0
    prompts: int = 0
    genai_greedy_equal_prompts: int | None = None
    tokenizer_equal_texts: int | None = None  # gguf: texts where llama.cpp's token ids equal Hugging Face's
    tokenizer_texts: int | None = None
    tensor_fallbacks: list[dict] | None = None  # gguf quantized: tensors llama.cpp kept in another type, and why
    top1_agreement: float = math.nan
    ppl_torch: float = math.nan
    ppl: float = math.nan
    ppl_increase: float = math.nan
    eval_tokens: int = 0
    thresholds: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    prompt_checks: list[PromptCheck] = field(default_factory=list)
    size_bytes: int | None = None
    export_seconds: float | None = None
    verify_seconds: float | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def check_prompts(reference: TorchReference, exported, prompts: list[list[int]], texts: list[str], new_tokens: int):
    """Teacher-forced prefill + decode of torch's greedy continuation; one PromptCheck per prompt."""
    checks = []
    for ids, text in zip(prompts, texts):
        continuation = reference.greedy(ids, new_tokens)
        expected = reference.logits(ids + continuation[:-1])  # logits that predict each continuation token
        got = [exported.forward_all(ids, 0)]
        for step, token in enumerate(continuation[:-1]):
            got.append(exported.forward_all([token], len(ids) + step))
        got = np.concatenate(got)
        choices = got[len(ids) - 1 :].argmax(-1).tolist()
        mismatches = [i for i, (a, b) in enumerate(zip(choices, continuation)) if a != b]
        checks.append(
            PromptCheck(
                prompt=text,
                prompt_tokens=len(ids),
                max_abs_logit_diff=float(np.abs(got - expected).max()),
                logit_scale=float(np.abs(expected).max()),
                greedy_equal=not mismatches,
                first_greedy_mismatch=mismatches[0] if mismatches else None,
            )
        )
    return checks


def held_out_metrics(reference: TorchReference, exported, windows: list[list[int]]) -> dict:
    """Top-1 agreement with torch and both perplexities over the held-out windows (prefill only)."""
    agree = total = 0
    nll_torch = nll_exported = 0.0
    for window in windows:
        expected_top1, expected_nll = reference.window_stats(window)
        got = exported.forward_all(window, 0)
        agree += int((got.argmax(-1) == expected_top1).sum())
        total += len(window)
        nll_torch += expected_nll
        nll_exported += _nll(got[:-1], np.array(window[1:]))
    predicted = sum(len(w) - 1 for w in windows)
    ppl_torch, ppl = _exp(nll_torch / predicted), _exp(nll_exported / predicted)
    return {
        "top1_agreement": agree / total,
        "ppl_torch": ppl_torch,
        "ppl": ppl,
        "ppl_increase": ppl / ppl_torch - 1.0,
        "eval_tokens": total,
    }


def _exp(x: float) -> float:
    """exp that answers inf instead of raising: a broken export may have astronomic perplexity."""
    return math.exp(x) if x < 700 else math.inf


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed negative log-likelihood of ``targets``: each row's log-sum-exp less the target's logit.

    Exponentials in the logits' own float32, sums in float64 (agrees with an all-float64 log-softmax to
    ~1e-11 relative), and no [tokens, vocab] log-probability matrix: 4x faster, and the export judges
    ~500 windows of 128 x 49,152 logits on a real model."""
    logits = np.asarray(logits, dtype=np.float32)
    peak = logits.max(-1, keepdims=True)
    sums = np.exp(logits - peak).sum(-1, dtype=np.float64)
    target_logits = logits[np.arange(len(targets)), targets].astype(np.float64)
    return float((np.log(sums) + peak[:, 0].astype(np.float64) - target_logits).sum())


def _windows(token_ids: list[int], max_seq_len: int) -> list[list[int]]:
    """Consecutive, non-overlapping windows of held-out tokens, each short enough to prefill in one call."""
    size = min(EVAL_WINDOW, max_seq_len - 1)
    return [token_ids[i : i + size] for i in range(0, len(token_ids) - size + 1, size)]


def _split(token_ids: list[int], max_seq_len: int) -> tuple[list[list[int]], list[list[int]]]:
    """(judged windows, calibration windows): up to EVAL_WINDOWS and CALIBRATION_WINDOWS, judged first.

    A text too short for both still gives each its own windows where it holds two or more (calibration
    takes the last third, at most CALIBRATION_WINDOWS); a single window serves both (verify.json says so).
    """
    windows = _windows(token_ids, max_seq_len)
    if len(windows) >= EVAL_WINDOWS + CALIBRATION_WINDOWS:
        return windows[:EVAL_WINDOWS], windows[EVAL_WINDOWS : EVAL_WINDOWS + CALIBRATION_WINDOWS]
    if len(windows) < 2:
        return windows, windows
    calibration = min(CALIBRATION_WINDOWS, max(1, len(windows) // 3))
    return windows[: len(windows) - calibration][:EVAL_WINDOWS], windows[len(windows) - calibration :]


def eval_windows(token_ids: list[int], max_seq_len: int) -> list[list[int]]:
    """The windows that judge the variants."""
    return _split(token_ids, max_seq_len)[0]


def calibration_windows(token_ids: list[int], max_seq_len: int) -> list[list[int]]:
    """The windows that calibrate the quantizers: never the judged ones, unless the text holds one window."""
    return _split(token_ids, max_seq_len)[1]


def heldout_limit() -> int:
    """Held-out tokens to read: enough for the judged and the calibration windows."""
    return (EVAL_WINDOWS + CALIBRATION_WINDOWS) * EVAL_WINDOW


def verify_variant(
    report: VariantReport,
    reference: TorchReference,
    exported: Backend,
    prompts: dict[str, list[int]],
    windows: list[list[int]],
    max_seq_len: int,
    eos: list[int] | None = None,
    genai_greedy=None,
) -> VariantReport:
    """Fill ``report`` with the checks for its quantization and list every threshold it misses."""
    longest = max(len(ids) for ids in prompts.values())
    new_tokens = max(1, min(GREEDY_TOKENS, max_seq_len - longest))
    checks = check_prompts(reference, exported, list(prompts.values()), list(prompts), new_tokens)
    if genai_greedy is not None:  # (prompt, new_tokens) -> onnxruntime-genai's own greedy tokens
        for check, ids in zip(checks, prompts.values()):
            expected = before_eos(reference.greedy(ids, new_tokens), eos or [])
            check.genai_greedy_equal = genai_greedy(ids, new_tokens) == expected
        report.genai_greedy_equal_prompts = sum(bool(c.genai_greedy_equal) for c in checks)
    report.prompt_checks = checks
    report.prompts = len(checks)
    report.max_abs_logit_diff = max(c.max_abs_logit_diff for c in checks)
    report.logit_scale = max(c.logit_scale for c in checks)
    report.max_rel_logit_diff = report.max_abs_logit_diff / report.logit_scale
    report.greedy_equal_prompts = sum(c.greedy_equal for c in checks)
    if windows:
        for key, value in held_out_metrics(reference, exported, windows).items():
            setattr(report, key, value)

    if report.tokenizer_texts is not None and report.tokenizer_equal_texts != report.tokenizer_texts:
        report.failures.append(
            f"llama.cpp's token ids differ from the Hugging Face tokenizer's on "
            f"{report.tokenizer_texts - report.tokenizer_equal_texts} of {report.tokenizer_texts} texts"
        )
    if report.quantization in MAX_REL_LOGIT_DIFF:
        limit = MAX_REL_LOGIT_DIFF[report.quantization]
        report.thresholds = {"max_rel_logit_diff": limit, "greedy": "identical"}
        if not report.max_rel_logit_diff <= limit:
            report.failures.append(
                f"max |logit difference| {report.max_abs_logit_diff:.2e} > {limit:.0e} x the logits' scale "
                f"{report.logit_scale:.3g} = {limit * report.logit_scale:.2e}"
            )
        if report.greedy_equal_prompts != report.prompts:
            report.failures.append(
                f"greedy {new_tokens}-token continuation differs from torch for "
                f"{report.prompts - report.greedy_equal_prompts} of {report.prompts} prompts"
            )
        if report.genai_greedy_equal_prompts is not None and report.genai_greedy_equal_prompts != report.prompts:
            report.failures.append(
                f"onnxruntime-genai's greedy tokens differ from torch's for "
                f"{report.prompts - report.genai_greedy_equal_prompts} of {report.prompts} prompts"
            )
    else:
        limits = QUANTIZED_THRESHOLDS[report.quantization]
        report.thresholds = dict(limits)
        if not windows:
            report.failures.append("no held-out text to measure top-1 agreement and perplexity on")
        else:
            if not report.top1_agreement >= limits["min_top1_agreement"]:
                report.failures.append(
                    f"top-1 agreement {report.top1_agreement:.3f} < {limits['min_top1_agreement']:.2f}"
                )
            if not report.ppl_increase <= limits["max_ppl_increase"]:
                report.failures.append(
                    f"perplexity +{100 * report.ppl_increase:.1f}% > +{100 * limits['max_ppl_increase']:.0f}%"
                )
    return report
