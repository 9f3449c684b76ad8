"""How far apart equally good roundings put a quantized variant's perplexity change (the noise floor under
effllm-export's verdicts on a real model), and whether another 8-bit rounding beats that noise.

executorch-8da4w keeps v_proj, up_proj, down_proj, the lm_head and the embedding at 8 bits per channel. Those
8-bit codes are round-to-nearest on a per-row scale; any scale within a hair of it is as good (the weights'
error barely moves), yet the perplexity change on 8,192 judged tokens moves by tenths of a point. This script
builds 8da4w's weights exactly as effllm-export does (executorch_export.quantize_8da4w_ and
quantize_embedding_, GPTQ on the same calibration windows), runs them eagerly in torch (torchao's tensors:
int8 per-token activations included), then re-rounds only the 8-bit tensors, once per seed, with every row's
scale moved by a random factor within +-0.1% around one of these scales:

    torchao   what torchao's symmetric int8 takes: max|w| / 127.5, codes clamped to -128..127 (the largest
              positive weight of a row is clipped by up to half a step)
    amax127   max|w| / 127: every weight on the grid, nothing clipped (llama.cpp's Q8_0 rule)

    python bench/rounding_noise.py MODEL_DIR --eval-text TEXT [--seeds 6]
        -> bench/results/rounding_noise.{json,md}   (--out to name another stem)

Windows as effllm-export cuts --eval-text: the first 64 windows of 128 tokens are judged, the next 64
calibrate. Not a timing: the numbers do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SCALE_JITTER = 1e-3  # each 8-bit row's scale times 1 + U(-SCALE_JITTER, SCALE_JITTER)
# the per-row scale each rounding starts from (the docstring says which is which)
ROUNDINGS = {"torchao": 127.5, "amax127": 127.0}


def windows_of(model_dir: Path, eval_text: Path, max_seq_len: int) -> tuple[list, list]:
    """(judged windows, calibration windows) as effllm-export cuts --eval-text."""
    from effllm.export.heldout import heldout_tokens
    from effllm.export.verify import calibration_windows, eval_windows, heldout_limit
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = heldout_tokens(eval_text, None, tokenizer, heldout_limit()).ids
    return eval_windows(ids, max_seq_len), calibration_windows(ids, max_seq_len)


@torch.no_grad()
def logits_of(model, windows: list[list[int]], batch: int = 8) -> torch.Tensor:
    return torch.cat([model(torch.tensor(windows[i : i + batch]), use_cache=False).logits for i in range(0, len(windows), batch)])


def mean_nll(logits: torch.Tensor, windows: list[list[int]]) -> float:
    targets = torch.tensor(windows)[:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1)).item()


@torch.no_grad()
def reround_8bit_(quantized, fp32, levels: float, seed: int) -> int:
    """Re-round every 8-bit per-row tensor of ``quantized`` (torchao's IntxUnpackedToInt8Tensor) from the fp32
    model's weights on the scale max|w| / levels, moved per row by a random factor; returns how many moved."""
    generator = torch.Generator().manual_seed(seed)
    moved = 0
    fp32_weights = dict(fp32.named_parameters(remove_duplicate=False))
    for name, param in quantized.named_parameters(remove_duplicate=False):
        block = getattr(param, "block_size", None)
        if block is None or param.target_dtype != torch.int8 or block[-1] != param.shape[-1]:
            continue  # int4 groups keep their GPTQ codes
        weight = fp32_weights[name]
        scale = weight.abs().amax(-1, keepdim=True).clamp_min(1e-12) / levels
        scale = scale * (1 + SCALE_JITTER * (2 * torch.rand(scale.shape, generator=generator) - 1))
        param.qdata.copy_(torch.round(weight / scale).clamp(-128, 127))
        param.scale.copy_(scale.reshape(param.scale.shape))
        moved += 1
    return moved


def measure(model_dir: Path, eval_text: Path, seeds: int, max_seq_len: int) -> dict:
    from effllm.export.executorch_export import DEFAULT_GROUP_SIZE, quantize_8da4w_, quantize_embedding_
    from effllm.export.weight_quant import input_gram
    from effllm.runtime.bench_report import portable_path

    from effllm import EfficientLLMForCausalLM

    base = EfficientLLMForCausalLM.from_pretrained(model_dir, dtype="float32").eval().requires_grad_(False)
    judged, calibration = windows_of(model_dir, eval_text, max_seq_len)
    reference = logits_of(base, judged)
    reference_nll, reference_top1 = mean_nll(reference, judged), reference.argmax(-1)
    grams = input_gram(base, calibration)
    rows = []
    for rounding, seed in [("export", None)] + [(r, s) for r in ROUNDINGS for s in range(seeds)]:
        start = time.perf_counter()
        model = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_8da4w_(model, DEFAULT_GROUP_SIZE, grams)
            quantize_embedding_(model)
        moved = 0 if seed is None else reround_8bit_(model, base, ROUNDINGS[rounding], seed)
        logits = logits_of(model, judged)
        rows.append({
            "rounding": rounding, "seed": seed, "tensors_rerounded": moved,
            "top1_agreement": (logits.argmax(-1) == reference_top1).float().mean().item(),
            "ppl_increase": math.exp(mean_nll(logits, judged) - reference_nll) - 1,
        })  # fmt: skip
        row = rows[-1]
        print(f"{rounding} seed {seed}: top-1 {row['top1_agreement']:.3f} ppl {100 * row['ppl_increase']:+.2f}% "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    summary = {}
    for rounding in ROUNDINGS:
        values = [r["ppl_increase"] for r in rows if r["rounding"] == rounding]
        top1 = [r["top1_agreement"] for r in rows if r["rounding"] == rounding]
        summary[rounding] = {
            "ppl_increase_mean": statistics.mean(values),
            "ppl_increase_stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "ppl_increase_range": [min(values), max(values)],
            "top1_agreement_mean": statistics.mean(top1),
        }
    return {
        "model_dir": portable_path(model_dir), "eval_text": eval_text.name,
        "judged_tokens": sum(len(w) for w in judged), "calibration_tokens": sum(len(w) for w in calibration),
        "ppl_torch": math.exp(reference_nll), "scale_jitter": SCALE_JITTER, "rows": rows, "summary": summary,
    }  # fmt: skip


def render(report: dict) -> str:
    lines = [
        "# 8da4w's perplexity change under equally good 8-bit roundings",
        "",
        f"Model `{report['model_dir']}`; text `{report['eval_text']}`: {report['judged_tokens']:,} judged tokens "
        f"(torch ppl {report['ppl_torch']:.2f}), {report['calibration_tokens']:,} calibration tokens. 8da4w's weights "
        "as effllm-export builds them, run eagerly in torch (torchao); 'export' is that model as is; each other row "
        "re-rounds only the 8-bit tensors on the rounding's per-row scale times 1 + U(-"
        f"{report['scale_jitter']:g}, {report['scale_jitter']:g}).",
        "",
        "| rounding | seed | 8-bit tensors re-rounded | top-1 vs torch | ppl change |",
        "|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        seed = "-" if r["seed"] is None else r["seed"]
        lines.append(
            f"| {r['rounding']} | {seed} | {r['tensors_rerounded']} | {r['top1_agreement']:.3f} | "
            f"{100 * r['ppl_increase']:+.2f}% |"
        )
    lines += ["", "| rounding | ppl change: mean | standard deviation | range | top-1 mean |", "|---|---|---|---|---|"]
    for rounding, s in report["summary"].items():
        lo, hi = s["ppl_increase_range"]
        lines.append(
            f"| {rounding} | {100 * s['ppl_increase_mean']:+.2f}% | {100 * s['ppl_increase_stdev']:.2f} points | "
            f"{100 * lo:+.2f}% to {100 * hi:+.2f}% | {s['top1_agreement_mean']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="an effllm model directory (effllm-train's <out>/model)")
    parser.add_argument("--eval-text", type=Path, required=True, help="the text effllm-export --eval-text judged on")
    parser.add_argument("--seeds", type=int, default=6, help="re-roundings per rounding (default 6)")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="effllm-export's --max-seq-len (default 2048)")
    parser.add_argument("--out", type=Path, default=RESULTS / "rounding_noise", help="path stem for .json and .md")
    args = parser.parse_args(argv)
    for path in (args.model_dir / "config.json", args.eval_text):
        if not path.is_file():
            parser.exit(2, f"rounding_noise: {path} is not a file; give an effllm model directory and a text file\n")
    report = measure(args.model_dir, args.eval_text, args.seeds, args.max_seq_len)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
