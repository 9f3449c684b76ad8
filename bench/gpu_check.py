"""GPU check: pruning-aware training of a ~100M model in bf16, then ONNX export parity (<= 8 minutes).

What it measures, on one GPU (``--toy``: a tiny model on the CPU, for the test suite):

1. A ~110M-parameter Llama-style source (d=768, 12 layers, 12 heads / 4 KV heads, FFN 3072, an
   8,192-token BPE trained here on the Python docs; random weights: this checks the system, not
   the quality) is pruned to half its size over the first half of ``--steps`` steps and trained
   on for the rest, with effllm.training.train.train as effllm-train runs it (bf16 autocast), twice:
   ``--compile`` off and on (on: compiled once the pruning phase is over).
2. Per run: tokens/s of the pruning phase and of the phase after it, the pruning overhead (the
   ratio of the two, per parameter), MFU of the phase after pruning (6 N + attention FLOPs per
   token against ``--peak-tflops``), peak GPU memory, wall time.
3. ``effllm-export`` of the result to ONNX with its verification against torch (fp32 logits to
   1e-4, identical greedy continuations); the verdict and verify.json's numbers are kept.

Writes bench/results/gpu_check.json and .md (``--toy`` writes beside ``--out`` only if given).

    python bench/gpu_check.py                 # on a GPU machine
    python bench/gpu_check.py --toy --out /tmp/gpu_check_toy.json   # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {  # hidden, layers, heads, kv heads, ffn, vocab, seq, batch
    "full": (768, 12, 12, 4, 3072, 8192, 512, 16),
    "toy": (64, 2, 4, 2, 128, 512, 64, 4),
}


def build_source(work: Path, size: str) -> Path:
    import torch

    from effllm import EfficientLLMConfig, EfficientLLMForCausalLM
    from effllm.data.corpus import python_docs_corpus
    from effllm.model.tokenizer import train_ascii_bpe

    hidden, layers, heads, kv, ffn, vocab, seq, _ = SIZES[size]
    tokenizer = train_ascii_bpe(python_docs_corpus(include_stdlib=size == "full"), vocab_size=vocab)
    config = EfficientLLMConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=hidden // heads, intermediate_size=ffn, max_position_embeddings=max(seq, 256),
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    EfficientLLMForCausalLM(config).save_pretrained(work / "source")
    tokenizer.save_pretrained(work / "source")
    return work / "source"


def train_once(source: Path, work: Path, size: str, steps: int, compile_: bool, device_type: str) -> dict:
    import torch

    from effllm.model.configuration_effllm import EfficientLLMConfig
    from effllm.model.params import count_parameters
    from effllm.training.dry_run import flops_per_token
    from effllm.training.recipe import TrainConfig
    from effllm.training.train import train

    _, _, _, _, _, _, seq, batch = SIZES[size]
    cfg = TrainConfig(
        source=str(source), target_params="0.5", tokens=steps * seq * batch, prune_fraction=0.5, seq_len=seq,
        batch_size=batch, warmup_steps=10, lr=6e-4, eval_every=10**9, eval_windows=8, save_every=10**9,
        log_every=10, granularity=1, dtype="bf16" if device_type == "cuda" else "fp32", compile=compile_, quiet=True,
        out=str(work / f"run-compile-{int(compile_)}"), overwrite=True,
    )  # fmt: skip
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - start
    final = EfficientLLMConfig.from_pretrained(result["model_dir"])
    rates = result["tokens_per_s_by_phase"]
    flops = flops_per_token(final, seq)
    out = {
        "compile": compile_,
        "source_params": result["source_params"],
        "final_params": count_parameters(final).total,
        "steps": result["steps"],
        "tokens": result["tokens"],
        "wall_s": wall,
        "tokens_per_s_prune_phase": rates.get("prune"),
        "tokens_per_s_after": rates.get("train"),
        "flops_per_token_after": flops,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device_type == "cuda" else None,
        "heldout_ppl": result["final_heldout_ppl"],
        "model_dir": result["model_dir"],
    }
    if rates.get("prune") and rates.get("train"):
        # pruning-phase time per token, against the same model size trained without pruning: the
        # phase's model is between the source and the result, so compare per parameter.
        mean_params = (result["source_params"] + out["final_params"]) / 2
        out["prune_overhead"] = (rates["train"] * out["final_params"]) / (rates["prune"] * mean_params) - 1
    return out


def export_parity(model_dir: str, work: Path) -> dict:
    cmd = [sys.executable, "-m", "effllm.export.cli", model_dir, "--format", "onnx", "--quantize", "none",
           "--out", str(work / "export"), "--max-seq-len", "256"]  # fmt: skip
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    verify = work / "export" / "verify.json"
    return {
        "exit_code": r.returncode,
        "seconds": time.perf_counter() - start,
        "verify": json.loads(verify.read_text()) if verify.is_file() else None,
        "stderr_tail": r.stderr[-1500:] if r.returncode else "",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--toy", action="store_true", help="a tiny model on the CPU (the test suite runs this)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default: 300, toy: 8)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the GPU's dense bf16 peak, for MFU (default: from the device name, H100/H200 989)")  # fmt: skip
    ap.add_argument("--no-compile-run", action="store_true", help="skip the --compile run")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default: bench/results/gpu_check.json)")
    args = ap.parse_args(argv)
    import torch

    from effllm.common.fileio import write_atomic, write_json_atomic

    size = "toy" if args.toy else "full"
    steps = args.steps or (8 if args.toy else 300)
    device_type = "cuda" if torch.cuda.is_available() and not args.toy else "cpu"
    if size == "full" and device_type != "cuda":
        print("gpu_check: error: no CUDA GPU here; run with --toy for the CPU check", file=sys.stderr)
        return 2
    out = args.out or (RESULTS / "gpu_check.json" if not args.toy else None)
    name = torch.cuda.get_device_name() if device_type == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops or (989.0 if any(k in name for k in ("H100", "H200")) else None)
    work = Path(tempfile.mkdtemp(prefix="effllm-gpucheck-"))
    started = time.perf_counter()
    try:
        source = build_source(work, size)
        runs = [train_once(source, work, size, steps, False, device_type)]
        if not args.no_compile_run:
            runs.append(train_once(source, work, size, steps, True, device_type))
        for run in runs:
            if peak and run["tokens_per_s_after"]:
                run["mfu_after"] = run["tokens_per_s_after"] * run["flops_per_token_after"] / (peak * 1e12)
        parity = export_parity(runs[0]["model_dir"], work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"device": name, "size": size, "steps": steps, "peak_tflops": peak, "runs": runs, "export": parity,
              "total_s": time.perf_counter() - started, "torch": torch.__version__}  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k != "export"} | {"export_exit": parity["exit_code"]},
                     indent=1, default=str))  # fmt: skip
    if out is not None:
        write_json_atomic(out, result, indent=2)
        lines = [f"# GPU check ({name}, {size})", "", "| compile | params | tokens/s prune phase | tokens/s after | "
                 "MFU after | peak GiB | wall s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in runs:
            mfu = f"{r['mfu_after']:.1%}" if r.get("mfu_after") else "-"
            mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] else "-"
            lines.append(f"| {r['compile']} | {r['source_params']:,} -> {r['final_params']:,} | "
                         f"{r['tokens_per_s_prune_phase'] or 0:,.0f} | {r['tokens_per_s_after'] or 0:,.0f} | {mfu} | "
                         f"{mem} | {r['wall_s']:.0f} |")  # fmt: skip
        lines += ["", f"ONNX export and verification: exit {parity['exit_code']} ({parity['seconds']:.0f} s).", ""]
        write_atomic(out.with_suffix(".md"), "\n".join(lines))
    return 0 if parity["exit_code"] == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
