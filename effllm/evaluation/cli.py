"""effllm-eval: held-out perplexity (sliding window) and zero-shot tasks through lm-evaluation-harness.

Perplexity runs on any text effllm-train accepts (files, directories, JSONL, Parquet, hub
datasets) or on a token file written by effllm-train (``data/heldout.bin``). Results go to
eval.json and eval.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effllm import quiet_library_logs
from effllm.common.cli_args import CliParser
from effllm.common.errors import run_cli
from effllm.common.fileio import write_atomic, write_json_atomic
from effllm.evaluation.errors import EvalError
from effllm.evaluation.perplexity import perplexity
from effllm.evaluation.zero_shot import PAPER_TASKS, zero_shot

DEFAULT_MODEL = Path("runs/quickstart/model")


def to_markdown(report: dict) -> str:
    lines = [f"# effllm-eval: `{report['model']}`", ""]
    if "perplexity" in report:
        p = report["perplexity"]
        lines += ["| held-out | tokens | window/stride | perplexity |", "|---|---|---|---|",
                  f"| {', '.join(p['data'])} | {p['tokens']:,} | {p['window']}/{p['stride']} | {p['perplexity']:.3f} |", ""]  # fmt: skip
    if "zero_shot" in report:
        lines += ["| task | metric | value |", "|---|---|---|"]
        for task, metrics in report["zero_shot"]["results"].items():
            for name, value in metrics.items():
                if "stderr" not in name and name != "sample_len":
                    lines.append(f"| {task} | {name} | {value:.4f} |")
        lines.append("")
    return "\n".join(lines)


def parser() -> CliParser:
    p = CliParser(
        prog="effllm-eval",
        description="Held-out perplexity (sliding window) and zero-shot tasks (lm-evaluation-harness) of a model "
        "directory. With no arguments: the quickstart result on its held-out split.",
    )
    p.add_argument("model", nargs="?", default=str(DEFAULT_MODEL), help=f"model directory (default: {DEFAULT_MODEL})")
    p.add_argument("--data", nargs="+", help="text/JSONL/Parquet files, directories, a hub dataset id, or a token "
                   ".bin from effllm-train (default: <model>/../data/heldout.bin)")  # fmt: skip
    p.add_argument("--window", type=int, help="tokens per window (default: min(max positions, 1024))")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: window/2)")
    p.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens")
    p.add_argument("--tasks", help=f"comma-separated lm-eval tasks, or 'paper' for {','.join(PAPER_TASKS)}; "
                   "needs the datasets (internet) and pip install 'effllm[eval]'")  # fmt: skip
    p.add_argument("--include-path", help="directory of extra lm-eval task YAMLs (your own local tasks)")
    p.add_argument("--limit", type=int, help="at most this many examples per task")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default: 8)")
    p.add_argument("--no-perplexity", action="store_true", help="skip perplexity (only run --tasks)")
    p.add_argument("--out", help="where eval.json and eval.md go (default: <model>/../eval)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_library_logs()
    return run_cli("effllm-eval", lambda: evaluate(args))


def evaluate(args: argparse.Namespace) -> int:
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        hint = "run effllm-train first" if model_dir == DEFAULT_MODEL else "give a model directory"
        raise EvalError(f"{model_dir} is not a model directory (no config.json); {hint}")
    out = Path(args.out) if args.out else model_dir.parent / "eval"
    from effllm.model.model_dir import load_model, load_tokenizer  # here: transformers loads after the logs are quiet

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    report: dict = {"model": str(model_dir)}
    if not args.no_perplexity:
        report["perplexity"] = perplexity(model, tokenizer, model_dir, args.data, args.window, args.stride,
                                          args.max_tokens, not args.quiet)  # fmt: skip
    if args.tasks:
        tasks = PAPER_TASKS if args.tasks == "paper" else [t.strip() for t in args.tasks.split(",") if t.strip()]
        report["zero_shot"] = zero_shot(model, tokenizer, tasks, args.limit, args.batch_size, args.include_path)
    write_json_atomic(out / "eval.json", report)
    markdown = to_markdown(report)
    write_atomic(out / "eval.md", markdown)
    print(markdown)
    print(f"written: {out / 'eval.json'}, {out / 'eval.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
