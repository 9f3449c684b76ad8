"""Block-wise weight quantization that minimises the error where the model's inputs are large.

Round-to-nearest on the absolute maximum (what onnxruntime's MatMulNBits quantizer and torchao's
defaults do) spends the 4-bit grid on the largest weight of each block and treats every input channel
alike. A real model's inputs are not alike: a few channels carry most of the activation energy (outlier
channels), and an error in a weight that multiplies such a channel costs far more than one in a quiet
channel. Two steps, both fed by the second moments of each nn.Linear's inputs on calibration text
(:func:`input_gram`, E[x x^T]):

1. The grid: as llama.cpp's quantizers do with an importance matrix, each block of ``block`` input
   channels (per output row) tries a range of scales, refits the scale (and zero point) by weighted least
   squares for the integer codes each one gives, and keeps the candidate with the least error weighted by
   the mean squared input of each channel (the Gram matrix's diagonal).
2. The codes, at 4 bits and below: GPTQ (Frantar et al., 2022) on that fixed grid. Columns are rounded
   one at a time, most active input channel first, and each rounding error is pushed onto the columns
   not yet rounded along the inverse of E[x x^T], so the layer's output error (not each weight's) is
   what is minimised. Rounding weights alone ignores that inputs are correlated.

On SmolLM2-135M dithered off its 4-bit grid (4-bit, blocks of 32, the tied embedding / lm_head at 8 bits;
held-out English, weights quantized in torch) the perplexity increase is +11.5% with the search alone and
+1.7% with GPTQ on its grid (8,192 calibration tokens; top-1 agreement with fp32 0.76 -> 0.88);
bench/results/real_model_quantization.md has the tables.

The result is codes, scales and zero points in the layouts the exporters write: onnxruntime's
MatMulNBits (unsigned codes, integer zero points) and torchao's IntxUnpackedToInt8Tensor, which
ExecuTorch's XNNPACK delegate runs (signed codes, symmetric: XNNPACK's 4-bit groups have no zero point).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Candidate scales: the range divided by (levels + STEP * i) for i in -STEPS..STEPS (llama.cpp's search
# makes the same sweep); below 0 the largest weights clip, above it the grid is finer than the range.
# Symmetric codes -2^(b-1)..2^(b-1)-1 take levels = 2^(b-1) - 0.5 (the negative side has one more).
# 8-bit codes are fine enough that the plain range (i = 0) is all but optimal: one candidate, refitted.
SEARCH_STEPS = 10
SEARCH_STEP = 0.1
CHUNK_ELEMENTS = 1 << 22
IMPORTANCE_BATCH = 8
# GPTQ: codes at this many bits or fewer (4-bit, and GGUF's 5-bit Q5_0; 8-bit rounding error is already
# small); the damping added to E[x x^T]'s diagonal, as a fraction of its mean, keeps the inverse stable for
# channels calibration barely excited (GPTQ's default); columns per lazy batch of the error update (GPTQ's default).
GPTQ_MAX_BITS = 5
GPTQ_DAMP = 0.01
GPTQ_BATCH = 128


@dataclass
class BlockQuant:
    """A weight [out, in] in blocks of ``block`` along ``in`` (the last block padded with zeros)."""

    codes: torch.Tensor  # int64 [out, blocks, block]: 0..2^bits-1 (asymmetric) or -2^(bits-1)..2^(bits-1)-1
    scales: torch.Tensor  # float32 [out, blocks]
    zero_points: torch.Tensor | None  # int64 [out, blocks] (asymmetric), None (symmetric)
    in_features: int
    bits: int

    def dequantize(self) -> torch.Tensor:
        codes = self.codes.float()
        if self.zero_points is not None:
            codes = codes - self.zero_points.unsqueeze(-1).float()
        weight = codes * self.scales.unsqueeze(-1)
        return weight.reshape(weight.shape[0], -1)[:, : self.in_features]


@torch.no_grad()
def input_gram(model: nn.Module, windows: list[list[int]]) -> dict[str, torch.Tensor]:
    """{name of every nn.Linear: E[x x^T] of its input x over the token windows}, float32 [in, in]; its
    diagonal is llama.cpp's importance matrix (the mean squared input per channel). Linears fed the same
    tensor (q/k/v, gate/up) share one matrix object. Runs the model once per batch, fp32, no KV cache."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    alias: dict[str, str] = {}
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # per forward: input data pointer -> (input, its owner)

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0]
            owner = seen.get(x.data_ptr())
            if owner is not None and owner[0] is x:
                alias[name] = owner[1]
                return
            seen[x.data_ptr()] = (x, name)  # holding x keeps its pointer from being reused in this forward
            x = x.detach().reshape(-1, x.shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        # equal-length windows in batches: one matrix product per layer instead of one per window
        by_length: dict[int, list[list[int]]] = {}
        for window in windows:
            by_length.setdefault(len(window), []).append(window)
        for group in by_length.values():
            for i in range(0, len(group), IMPORTANCE_BATCH):
                seen.clear()
                model(torch.tensor(group[i : i + IMPORTANCE_BATCH]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        seen.clear()
    grams = {name: sums[name].div_(counts[name]) for name in sums}
    return {**grams, **{name: grams[owner] for name, owner in alias.items() if owner in grams}}


@torch.no_grad()
def quantize_blocks(
    weight: torch.Tensor,
    bits: int,
    block: int,
    symmetric: bool,
    gram: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> BlockQuant:
    """Quantize ``weight`` [out, in] block-wise: the grid by the weighted-error search, the codes by GPTQ.

    gram: the inputs' E[x x^T] [in, in] (its diagonal weights the search; GPTQ at <= GPTQ_MAX_BITS), or
    just its diagonal [in] (the search alone), or None (every channel alike, round to nearest on the
    searched grid); scale_dtype: the precision the runtime keeps scales in (XNNPACK rounds its group
    scales to bfloat16), so the search sees it.
    """
    full = gram is not None and gram.dim() == 2
    importance = gram.diagonal() if full else gram
    out_features, in_features = weight.shape
    pad = (-in_features) % block
    # contiguous first: the candidates' errors can nearly tie, and a summation order that follows the
    # memory layout could then pick other codes for the same values (the ONNX graph holds W transposed)
    x = nn.functional.pad(weight.detach().float().contiguous(), (0, pad)).reshape(out_features, -1, block)
    if importance is None:
        importance = torch.ones(in_features)
    # A small floor: channels no calibration token excited still count a little (and pad counts nothing).
    w = importance.float().clamp_min(0) + 1e-8 * float(importance.float().mean().clamp_min(1e-30))
    w = nn.functional.pad(w, (0, pad)).reshape(1, -1, block)
    # rows in chunks that stay in the CPU's cache: the search is a dozen passes over each element
    rows = max(1, CHUNK_ELEMENTS // x[0].numel())
    parts = [_search(x[r : r + rows], w, bits, symmetric, scale_dtype) for r in range(0, out_features, rows)]
    codes, scales, zeros = (torch.cat(t) if t[0] is not None else None for t in zip(*parts))
    quant = BlockQuant(codes, scales, zeros, in_features, bits)
    if full and bits <= GPTQ_MAX_BITS:
        quant.codes = gptq_codes(weight, gram, quant)
    return quant


@torch.no_grad()
def gptq_codes(weight: torch.Tensor, gram: torch.Tensor, grid: BlockQuant) -> torch.Tensor:
    """GPTQ's codes for ``weight`` [out, in] on ``grid``'s scales and zero points (kept as they are: the
    grid was fitted to the weights, and a static grid lets columns go in any order), in grid.codes' layout.

    Act order: columns by descending E[x_j^2], so the channels that matter most are rounded first, while
    the most columns are left to absorb their error. The padding of the last block keeps grid's codes.
    """
    out_features, in_features = weight.shape
    block = grid.codes.shape[-1]
    qmin, qmax = code_range(grid.bits, symmetric=grid.zero_points is None)
    hessian = gram.detach().double().clone()
    w = weight.detach().float().clone()
    dead = hessian.diagonal() <= 0  # channels calibration never excited: their weights cost nothing
    hessian[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(hessian.diagonal(), descending=True)
    hessian = hessian[order][:, order]
    hessian.diagonal().add_(GPTQ_DAMP * hessian.diagonal().mean())
    # the upper Cholesky factor of H^-1: row i holds how column i's error spreads onto the later columns
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True).float()
    # rows of the transposed weight are the columns GPTQ walks: contiguous, updated in place
    w = w[:, order].T.contiguous()  # [in, out] in processing order
    column_block = order // block
    scales = grid.scales.T[column_block].contiguous()  # [in, out]
    zeros = grid.zero_points.T[column_block].float() if grid.zero_points is not None else torch.zeros_like(scales)
    codes = torch.empty_like(w)
    for start in range(0, in_features, GPTQ_BATCH):
        end = min(start + GPTQ_BATCH, in_features)
        part, inv = w[start:end], inverse[start:end, start:end]
        errors = torch.empty_like(part)
        for i in range(end - start):
            s, z = scales[start + i], zeros[start + i]
            q = codes[start + i]
            torch.round(part[i] / s + z, out=q).clamp_(qmin, qmax)
            error = errors[i]
            torch.sub(part[i], (q - z).mul_(s), out=error).div_(inv[i, i])
            part[i + 1 :].addr_(inv[i, i + 1 :], error, alpha=-1)
        w[end:].addmm_(inverse[start:end, end:].T, errors, alpha=-1)
    result = grid.codes.clone()
    flat = result.reshape(out_features, -1)
    flat[:, order] = codes.T.long()
    return result


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer codes' (min, max): signed for symmetric blocks, unsigned with a zero point otherwise."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def _safe(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d.abs() > 1e-30, d, torch.ones_like(d))


def _search(x, w, bits, symmetric, scale_dtype):
    """One pass over the weights per candidate: its codes and three weighted sums; the rest (the refit
    and the candidate's error, expanded as sum w x^2 - 2 s sum w q x + s^2 sum w q^2) is per block."""
    qmin, qmax = code_range(bits, symmetric)
    if symmetric:
        span, base, levels = x.abs().amax(-1), None, qmax + 0.5
    else:
        lo = x.amin(-1)
        span, base, levels = x.amax(-1) - lo, lo, qmax
    sw, swx, swxx = w.sum(-1), (w * x).sum(-1), (w * x * x).sum(-1)
    steps = SEARCH_STEPS if bits <= 4 else 0
    best_err = best = None
    for i in range(-steps, steps + 1):
        scale0 = _safe(span / (levels + SEARCH_STEP * i))
        zero0 = torch.zeros_like(scale0) if symmetric else (-base / scale0).round().clamp(qmin, qmax)
        codes = torch.round(x / scale0.unsqueeze(-1) + zero0.unsqueeze(-1)).clamp_(qmin, qmax)
        wq = w * codes
        swq, swqx, swqq = wq.sum(-1), (wq * x).sum(-1), (wq * codes).sum(-1)
        if symmetric:
            zero = zero0
        else:  # least squares for scale and offset, the offset rounded to an integer zero point
            det = _safe(sw * swqq - swq * swq)
            fit_scale, fit_offset = (sw * swqx - swq * swx) / det, (swqq * swx - swq * swqx) / det
            zero = torch.where(fit_scale > 0, (-fit_offset / _safe(fit_scale)).round().clamp(qmin, qmax), zero0)
        # with q = codes - zero: sum w q x and sum w q^2 from the sums above
        sqx = swqx - zero * swx
        sqq = swqq - 2 * zero * swq + zero * zero * sw
        scale = sqx / _safe(sqq)
        scale = torch.where(scale > 0, scale, scale0).to(scale_dtype).float()
        err = swxx - 2 * scale * sqx + scale * scale * sqq
        if best is None:
            best_err, best = err, (scale0, zero0, scale, zero)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = tuple(torch.where(better, new, old) for new, old in zip((scale0, zero0, scale, zero), best))
    scale0, zero0, scale, zero = best
    codes = torch.round(x / scale0.unsqueeze(-1) + zero0.unsqueeze(-1)).clamp_(qmin, qmax)  # the winner's codes
    return codes.long(), scale, None if symmetric else zero.long()
