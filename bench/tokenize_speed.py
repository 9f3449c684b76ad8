"""Benchmark: tokenization throughput of effllm's data preparation with 1 and with N processes.

Builds a corpus of a few tens of MB offline (the source files of Python's standard library, one
document per file, as JSONL; then the embedded Python-docs corpus repeated to fill it up), trains
a byte-level BPE tokenizer of 8,192 tokens on the Python docs, and times
``prepare_tokens(..., num_proc=k)`` for each k, alternating (1, N, 1, N, ...) so that load from
other processes hits both alike. Every run writes its own shards; the runs' token streams are
checked to be identical. Each process uses one tokenizer thread (TOKENIZERS_PARALLELISM=false),
so the speed-up measures processes, not threads. Writes bench/results/tokenize_speed.{json,md}
with the load average (``uptime``) before and after.

    python bench/tokenize_speed.py                      # 32 MB, 1 vs 2 processes, 2 repeats
    python bench/tokenize_speed.py --mb 8 --repeats 1   # quicker
    python bench/tokenize_speed.py --procs 1,2,4,8      # on a larger machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"

RESULTS = Path(__file__).resolve().parent / "results"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


def _burn(n: int) -> float:
    start, s = time.perf_counter(), 0
    for i in range(n):
        s += i
    return time.perf_counter() - start


def machine_parallelism(procs: int, n: int = 20_000_000) -> float:
    """Throughput of ``procs`` processes running a pure-Python loop, against one: what the machine
    (its cores, and the other jobs on it) allows at this moment, the ceiling for any speed-up."""
    from multiprocessing import get_context

    one = _burn(n)
    with get_context("spawn").Pool(procs) as pool:
        start = time.perf_counter()
        pool.map(_burn, [n] * procs)
        many = time.perf_counter() - start
    return procs * one / many


def build_corpus(path: Path, megabytes: float) -> tuple[int, int]:
    """JSONL of stdlib source files (then the docs corpus, repeated) up to ``megabytes``; (docs, chars)."""
    from effllm.data.corpus import python_docs_corpus

    limit = int(megabytes * 1e6)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    docs = chars = 0
    with path.open("w") as f:

        def add(text: str) -> bool:
            nonlocal docs, chars
            f.write(json.dumps({"text": text}) + "\n")
            docs, chars = docs + 1, chars + len(text)
            return chars >= limit

        for p in files:
            text = p.read_text(encoding="utf-8", errors="replace")
            if text.strip() and add(text):
                return docs, chars
        for copy in range(1000):
            for text in python_docs_corpus():
                if add(f"[{copy}] {text}"):
                    return docs, chars
    return docs, chars


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=32.0, help="corpus size in MB of text (default: 32)")
    ap.add_argument("--procs", default="1,2", help="process counts to compare, comma-separated (default: 1,2)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each process count (default: 2)")
    ap.add_argument("--shard-chars", type=int, default=1 << 20, help="characters per shard (default: 1M)")
    ap.add_argument("--out", type=Path, default=RESULTS / "tokenize_speed.json", help="result JSON (and .md beside)")
    args = ap.parse_args(argv)
    procs = [int(x) for x in args.procs.split(",")]

    import numpy as np

    from effllm.common.fileio import write_atomic, write_json_atomic
    from effllm.data.corpus import python_docs_corpus
    from effllm.data.prepare import prepare_tokens
    from effllm.model.tokenizer import train_ascii_bpe

    work = Path(tempfile.mkdtemp(prefix="effllm-tokbench-"))
    try:
        corpus = work / "corpus.jsonl"
        docs, chars = build_corpus(corpus, args.mb)
        tokenizer = train_ascii_bpe(python_docs_corpus(), vocab_size=8192)
        print(f"corpus: {docs:,} documents, {chars / 1e6:.1f} M characters ({corpus.stat().st_size / 1e6:.1f} MB)")
        load_before = uptime()
        control_before = machine_parallelism(procs[-1])
        runs, reference = [], None
        for rep in range(args.repeats):
            for n in procs:
                out = work / f"out-{n}-{rep}"
                start = time.perf_counter()
                info = prepare_tokens(str(corpus), tokenizer, out, 0.01, show_progress=False, num_proc=n,
                                      shard_chars=args.shard_chars)  # fmt: skip
                seconds = time.perf_counter() - start
                tokens = info.train_tokens + info.heldout_tokens
                stream = [np.fromfile(p, dtype=info.dtype) for p in info.train_paths]
                digest = hash(np.concatenate(stream).tobytes())
                reference = digest if reference is None else reference
                assert digest == reference, "the token stream differs between process counts"
                runs.append({"num_proc": n, "repeat": rep, "seconds": seconds, "tokens": tokens,
                             "tokens_per_s": tokens / seconds, "shards": len(info.train_paths)})  # fmt: skip
                print(f"num_proc={n} repeat {rep}: {seconds:.2f} s, {tokens / seconds:,.0f} tokens/s, "
                      f"{len(info.train_paths)} shards")  # fmt: skip
                shutil.rmtree(out)
        load_after = uptime()
        control_after = machine_parallelism(procs[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    median = {n: statistics.median(r["tokens_per_s"] for r in runs if r["num_proc"] == n) for n in procs}
    speedup = {n: median[n] / median[procs[0]] for n in procs}
    result = {
        "corpus": {"documents": docs, "characters": chars, "source": "CPython stdlib sources + Python docs"},
        "tokenizer": "byte-level BPE, 8,192 tokens, trained on the Python docs",
        "shard_chars": args.shard_chars,
        "runs": runs,
        "median_tokens_per_s": median,
        "speedup_vs_first": speedup,
        "control_parallelism": [control_before, control_after],
        "load_before": load_before,
        "load_after": load_after,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    write_json_atomic(args.out, result)
    lines = [
        "# Tokenization speed: processes (bench/tokenize_speed.py)",
        "",
        f"Corpus: {docs:,} documents, {chars / 1e6:.1f} M characters (CPython stdlib sources, then the Python docs "
        f"repeated), built offline. Tokenizer: {result['tokenizer']}. Shards of {args.shard_chars:,} characters; "
        "one tokenizer thread per process. The token streams of all runs are identical (checked).",
        "",
        f"Machine: {os.cpu_count()} CPU cores; the load average before and after the run says how busy they were "
        "(the control below says how much a second process could gain at the time):",
        "",
        f"- before: `{load_before}`",
        f"- after: `{load_after}`",
        "",
        f"Control: a pure-Python loop in {procs[-1]} processes ran {control_before:.2f}x (before) and "
        f"{control_after:.2f}x (after) the throughput of one: the ceiling this machine allowed then.",
        "",
        "| processes | median tokens/s | speed-up | runs (tokens/s) |",
        "|---|---|---|---|",
    ]
    for n in procs:
        each = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in runs if r["num_proc"] == n)
        lines.append(f"| {n} | {median[n]:,.0f} | {speedup[n]:.2f}x | {each} |")
    lines += ["", f"Command: `python bench/tokenize_speed.py --mb {args.mb:g} --procs {args.procs} "
              f"--repeats {args.repeats}`", ""]  # fmt: skip
    write_atomic(args.out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
