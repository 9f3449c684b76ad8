"""effllm-eval: held-out perplexity (sliding window) and zero-shot tasks through lm-evaluation-harness.

Perplexity runs on any text effllm-train accepts (files, directories, JSONL, Parquet, hub
datasets) or on a token file written by effllm-train (``data/heldout.bin``). Zero-shot tasks go
through lm-evaluation-harness's own ``hf`` model with ``trust_remote_code``, exactly as a user
outside effllm would load the model, so the numbers are comparable with published ones.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import quiet_library_logs
from .cli_args import CliParser
from .errors import EffllmError, first_line, run_cli
from .fileio import write_atomic, write_json_atomic

PAPER_TASKS = ["arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande", "mmlu"]
DEFAULT_MODEL = Path("runs/quickstart/model")


class EvalError(EffllmError):
    """Bad input for effllm-eval: the message names the problem and the fix."""


@torch.no_grad()
def sliding_window_nll(model, ids: torch.Tensor, window: int, stride: int, show_progress: bool = False):
    """(total negative log-likelihood, tokens scored) over a 1-D token tensor.

    Every token after the first is scored exactly once. The first window scores its first
    ``window - 1`` tokens; each later one scores the next ``stride`` tokens and gives them at least
    ``window - stride`` tokens of context.
    """
    if not 1 <= stride < window:
        raise EvalError(f"--stride must be at least 1 and below the window ({window}); got {stride}")
    model.eval()
    device = next(model.parameters()).device
    n = ids.numel()
    total, pos = 0.0, 1  # pos: the next token to score
    bar = tqdm(total=max(n - 1, 0), desc="perplexity", unit="tok", disable=not show_progress)
    while pos < n:
        end = min(pos + (window - 1 if pos == 1 else stride), n)
        chunk = ids[max(0, end - window) : end].to(device)
        new = end - pos
        logits = model(chunk[None, :-1], use_cache=False).logits[0, -new:].float()
        total += F.cross_entropy(logits, chunk[-new:], reduction="sum").item()
        bar.update(new)
        pos = end
    bar.close()
    return total, max(n - 1, 0)


def load_eval_tokens(path_or_data: list[str] | None, tokenizer, max_tokens: int | None) -> torch.Tensor:
    """Tokens to score: a token file (.bin with meta.json beside it) or text read like training data."""
    from .data_sources import DataError, iter_pieces, resolve_sources

    if path_or_data and len(path_or_data) == 1 and path_or_data[0].endswith(".bin"):
        path = Path(path_or_data[0])
        meta = path.parent / "meta.json"
        if not path.is_file() or not meta.is_file():
            raise EvalError(f"{path}: a token file needs meta.json beside it (as effllm-train writes in <out>/data)")
        tokens = np.memmap(path, dtype=json.loads(meta.read_text())["dtype"], mode="r")
        if max_tokens:
            tokens = tokens[:max_tokens]
        return torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    ids: list[int] = []
    try:
        for source in resolve_sources(path_or_data):
            for text, end_of_doc in iter_pieces(source):
                ids += tokenizer(text, add_special_tokens=False)["input_ids"]
                if end_of_doc and tokenizer.eos_token_id is not None:
                    ids.append(tokenizer.eos_token_id)
                if max_tokens and len(ids) >= max_tokens:
                    return torch.tensor(ids[:max_tokens])
    except DataError as err:
        raise EvalError(str(err)) from None
    if len(ids) < 2:
        raise EvalError("the evaluation text has fewer than 2 tokens; give more text")
    return torch.tensor(ids)


def perplexity(model_dir: Path, data: list[str] | None, window: int | None, stride: int | None,
               max_tokens: int | None, show_progress: bool) -> dict:  # fmt: skip
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Both with trust_remote_code, as outside effllm: AutoTokenizer reads config.json (and its auto_map) too.
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    if data is None:
        heldout = model_dir.parent / "data" / "heldout.bin"
        if not heldout.is_file():
            raise EvalError(f"no --data given and no {heldout}; pass --data FILE (text, JSONL, Parquet or a .bin)")
        data = [str(heldout)]
    ids = load_eval_tokens(data, tokenizer, max_tokens)
    window = window or min(getattr(model.config, "max_position_embeddings", 1024), 1024)
    stride = stride or max(1, window // 2)
    nll, count = sliding_window_nll(model, ids, window, stride, show_progress)
    return {"data": data, "tokens": count, "window": window, "stride": stride,
            "nll_per_token": nll / count, "perplexity": math.exp(nll / count)}  # fmt: skip


def zero_shot(model_dir: Path, tasks: list[str], limit: int | None, batch_size: int, include_path: str | None) -> dict:
    try:
        import lm_eval
        from huggingface_hub.errors import LocalEntryNotFoundError
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError("zero-shot tasks need lm-evaluation-harness: pip install 'effllm[eval]'") from None
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise EvalError(f"unknown lm-eval task(s) {unknown}; see `lm-eval ls tasks` or give --include-path")
    try:
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={model_dir},trust_remote_code=True,dtype=float32",
            tasks=tasks,
            num_fewshot=0,
            limit=limit,
            batch_size=batch_size,
            device="cuda" if torch.cuda.is_available() else "cpu",
            task_manager=manager,
            log_samples=True,
        )
    except (ConnectionError, LocalEntryNotFoundError) as err:  # datasets' "Couldn't reach ... on the Hub"
        raise EvalError(
            f"the task datasets come from the Hugging Face Hub, which is not reachable ({first_line(err)}); "
            "run once online to cache them, or give local task YAMLs with --include-path"
        ) from None
    results = {
        task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        for task, metrics in out["results"].items()
    }
    samples = {task: [{"arguments": s["arguments"], "resps": s["resps"], "target": s["target"]} for s in rows]
               for task, rows in out.get("samples", {}).items()}  # fmt: skip
    return {"results": results, "samples": samples}


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
    report: dict = {"model": str(model_dir)}
    if not args.no_perplexity:
        report["perplexity"] = perplexity(model_dir, args.data, args.window, args.stride, args.max_tokens,
                                          not args.quiet)  # fmt: skip
    if args.tasks:
        tasks = PAPER_TASKS if args.tasks == "paper" else [t.strip() for t in args.tasks.split(",") if t.strip()]
        report["zero_shot"] = zero_shot(model_dir, tasks, args.limit, args.batch_size, args.include_path)
    write_json_atomic(out / "eval.json", report)
    markdown = to_markdown(report)
    write_atomic(out / "eval.md", markdown)
    print(markdown)
    print(f"written: {out / 'eval.json'}, {out / 'eval.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
