"""The method benchmark: pruning-aware pretraining vs training from scratch vs one-shot pruning.

At our scale on CPU: one corpus with a held-out split, a source S pretrained here, a target T of
about a quarter of S, and the same token budget for every method:
  (i)   pruning-aware pretraining S -> T (weight update none/obs x granularity 1/8),
  (ii)  T from scratch, with (i)'s auto-designed architecture and with a uniform one of equal size,
  (iii) one-shot pruning S -> T with the same saliency (K calibration batches), then recovery training.
Prints and writes (bench/results/method.{json,md}) the held-out perplexity table, the
architectures and the token counts.

    python bench/method.py                 # the default corpus (the quickstart's), ~20 min on 2 idle cores
    python bench/method.py --data my.jsonl --tokens 2M --source-tokens 4M
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from effllm import EfficientLLMConfig, EfficientLLMForCausalLM
from effllm.params import count_parameters, format_count, parse_count
from effllm.recipe import TrainConfig
from effllm.tokenizer import train_ascii_bpe
from effllm.train import train

RESULTS = Path(__file__).parent / "results"


def uniform_config_like(source: EfficientLLMConfig, target_params: int) -> EfficientLLMConfig:
    """A human-designed uniform model of about target_params: the source's depth and head_dim, with
    hidden size, heads and FFN width scaled down together (FFN kept at the source's ratio)."""
    heads, kv, ffn = source.layer_shapes()[0]
    best = None
    for hidden in range(64, source.hidden_size + 1, 32):
        scale = hidden / source.hidden_size
        h = max(1, round(heads * scale))
        k = max(1, min(h, round(kv * scale)))
        while h % k:
            k -= 1
        f = max(32, round(ffn * scale / 32) * 32)
        cfg = EfficientLLMConfig(**{**source.to_dict(), "per_layer_config": None, "hidden_size": hidden,
                                    "num_attention_heads": h, "num_key_value_heads": k, "intermediate_size": f})  # fmt: skip
        gap = abs(count_parameters(cfg).total - target_params)
        if best is None or gap < best[0]:
            best = (gap, cfg)
    return best[1]


def finished_run(cfg: TrainConfig) -> dict | None:
    """The results of an earlier, completed run with exactly these settings (the benchmark resumes)."""
    out = Path(cfg.out)
    if not (out / "results.json").is_file() or not (out / "run.json").is_file():
        return None
    stored = json.loads((out / "run.json").read_text())["config"]
    if stored != json.loads(json.dumps(asdict(cfg), default=str)):
        return None
    print("          (reusing the finished run in", out, ")", flush=True)
    return json.loads((out / "results.json").read_text())


def save_init(config: EfficientLLMConfig, tokenizer, path: Path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def one_shot_source(source_dir: Path, base: TrainConfig, target: int, granularity: int, calib_batches: int, out: Path):
    """Prune the trained source to the target at once from K calibration batches (LLM-Pruner style)."""
    from transformers import AutoTokenizer

    from effllm.data import TokenBatches, prepare_tokens
    from effllm.pruning import PruningConfig, one_shot_prune

    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    info = prepare_tokens(
        base.data, tokenizer, out / "data", heldout_fraction=base.heldout_fraction, show_progress=False
    )
    stream = TokenBatches(info.train_path, info.dtype, base.seq_len, base.batch_size, seed=base.seed + 1)
    model = EfficientLLMForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
    batches = [stream.next_batch() for _ in range(calib_batches)]
    one_shot_prune(model, batches, target, PruningConfig(granularity=granularity))
    model.save_pretrained(out / "pruned")
    tokenizer.save_pretrained(out / "pruned")
    return out / "pruned"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", help="training text (any effllm-train --data); default: the quickstart corpus")
    p.add_argument("--out", default="runs/method", help="working directory for the runs")
    p.add_argument("--source-tokens", type=parse_count, default=parse_count("600K"), help="tokens to pretrain S")
    p.add_argument("--tokens", type=parse_count, default=parse_count("300K"), help="token budget of every method")
    p.add_argument("--target-fraction", type=float, default=0.25, help="T's size as a fraction of S")
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--calib-batches", type=int, default=16, help="one-shot saliency batches (K)")
    p.add_argument(
        "--variants", default="none-1,none-8,obs-1,obs-8", help="pruning-aware variants: weightupdate-granularity"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    from effllm.quickstart import tokenizer_texts

    base = TrainConfig(data=args.data, seq_len=256, batch_size=16, lr=1e-3, warmup_steps=20, eval_every=10**9,
                       eval_windows=10**6, heldout_fraction=0.05, save_every=10**9, quiet=True, overwrite=True,
                       seed=args.seed)  # fmt: skip
    tokenizer = train_ascii_bpe(tokenizer_texts(base), vocab_size=args.vocab)
    source_config = EfficientLLMConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, intermediate_size=args.ffn,
        head_dim=args.hidden // args.heads, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    rows: list[dict] = []
    started = time.perf_counter()

    def run(name: str, cfg: TrainConfig, note: str) -> dict:
        t0 = time.perf_counter()
        print(f"[{time.perf_counter() - started:7.0f}s] {name}: {note}", flush=True)
        result = finished_run(cfg)
        if result is None:
            result = train(cfg)
        row = {"method": name, "note": note, "params": result["final_params"], "tokens": result["tokens"],
               "heldout_ppl": result["final_heldout_ppl"], "start_ppl": result["source_heldout_ppl"],
               "layer_shapes": result["layer_shapes"], "hidden_size": result["hidden_size"],
               "seconds": time.perf_counter() - t0}  # fmt: skip
        print(f"          -> {format_count(row['params'])} params, held-out ppl {row['heldout_ppl']:.2f} "
              f"({row['seconds']:.0f}s)", flush=True)  # fmt: skip
        rows.append(row)
        return result

    # S: the trained source
    source_run = run("source S", replace(base, init_config=save_init(source_config, tokenizer, out / "S-init"),
                                         tokens=args.source_tokens, out=str(out / "S")), "pretrained from scratch")  # fmt: skip
    source_dir = Path(source_run["model_dir"])
    target = int(args.target_fraction * source_run["final_params"])

    # (i) pruning-aware pretraining
    auto_arch = None
    for variant in args.variants.split(","):
        update, gran = variant.split("-")
        result = run(f"(i) pruning-aware, {update}, g{gran}",
                     replace(base, source=str(source_dir), target_params=str(target), tokens=args.tokens,
                             weight_update=update, granularity=int(gran), out=str(out / f"pap-{variant}")),
                     "S -> T over the first 60% of the tokens, then continued pretraining")  # fmt: skip
        if auto_arch is None:
            auto_arch = EfficientLLMConfig.from_pretrained(result["model_dir"])

    # (ii) from scratch: the auto-designed architecture, and a uniform one of equal size
    run("(ii) scratch, auto-designed arch", replace(base, init_config=save_init(auto_arch, tokenizer, out / "auto-init"),
        tokens=args.tokens, out=str(out / "scratch-auto")), "random init, (i)'s architecture")  # fmt: skip
    uniform = uniform_config_like(source_config, target)
    run("(ii) scratch, uniform arch", replace(base, init_config=save_init(uniform, tokenizer, out / "uniform-init"),
        tokens=args.tokens, out=str(out / "scratch-uniform")), "random init, human-designed uniform shape")  # fmt: skip

    # (iii) one-shot pruning, then recovery training
    calib_tokens = args.calib_batches * base.batch_size * base.seq_len
    pruned = one_shot_source(source_dir, base, target, 1, args.calib_batches, out / "oneshot")
    run("(iii) one-shot + recovery", replace(base, source=str(pruned), tokens=args.tokens, out=str(out / "oneshot-run")),
        f"one-shot from {args.calib_batches} batches ({calib_tokens:,} tokens), then recovery")  # fmt: skip

    write_results(rows, args, target, time.perf_counter() - started)
    return 0


def write_results(rows: list[dict], args, target: int, seconds: float) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [
        f"Source S: {format_count(rows[0]['params'])} parameters, pretrained on {rows[0]['tokens']:,} tokens. "
        f"Target T: {format_count(target)} ({args.target_fraction:.0%} of S). Every method below trains on "
        f"{args.tokens:,} tokens; held-out perplexity on the same held-out documents. Total {seconds / 60:.0f} min.",
        "",
        "| method | params | tokens | held-out ppl | architecture (heads/ffn per layer, hidden) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        arch = " ".join(f"{h}/{f}" for h, _, f in r["layer_shapes"]) + f", d={r['hidden_size']}"
        lines.append(
            f"| {r['method']} | {format_count(r['params'])} | {r['tokens']:,} | {r['heldout_ppl']:.2f} | {arch} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    (RESULTS / "method.md").write_text(table + "\n\nCommand: `python bench/method.py " + " ".join(sys.argv[1:]) + "`\n")
    (RESULTS / "method.json").write_text(json.dumps({"rows": rows, "target": target, "seconds": seconds,
                                                      "args": vars(args)}, indent=1, default=str))  # fmt: skip
    if not all(math.isfinite(r["heldout_ppl"]) for r in rows):
        print("warning: a run diverged (non-finite perplexity)")


if __name__ == "__main__":
    sys.exit(main())
