"""One effllm-bench measurement, in a fresh worker process: load, prefill, TTFT, decode, peak memory.

A fresh process per target: peak memory is then that backend's alone, its thread settings are its
own, and the ONNX workers import no torch, as in an onnxruntime-only deployment (the worker records
whether torch got imported). Every number is the median over ``repeats`` runs after ``warmup`` runs;
prompts are seeded random token ids, decoding is greedy and ignores EOS, so every run does the same work.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from effllm.common.errors import first_line

from .bench_targets import BenchSettings, Target
from .native import EXECUTORCH_OPENMP_ENV, quiet_native_output


def memory_mib(field_name: str = "VmHWM") -> float | None:
    """VmHWM (peak) or VmRSS (now) of this process in MiB, from /proc (Linux); ru_maxrss elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except (ImportError, OSError):
        return None


def measure(spec: dict) -> dict:
    """Time one backend on one variant (runs inside the worker process)."""
    from .generate import backend_class

    threads = spec.get("threads")
    prompt_lengths = [int(n) for n in spec["prompt_lengths"]]
    new_tokens, warmup, repeats = int(spec["new_tokens"]), int(spec["warmup"]), int(spec["repeats"])
    rss_before = memory_mib("VmRSS")
    start = time.perf_counter()  # load_s is a cold start: the runtime's imports, then the model
    cls = backend_class(spec["backend"])
    with quiet_native_output():
        cls.import_runtime(threads)
    rss_runtime = memory_mib("VmRSS")  # the process with the runtime's libraries in it, no model yet
    with quiet_native_output():
        backend = cls(spec["path"], threads=threads)
    load_s = time.perf_counter() - start
    limit = backend.max_seq_len or 1 << 30
    vocab = backend.vocab_size or 256
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    result: dict = {
        "load_s": load_s,
        "rss_before_load_mb": rss_before,
        "rss_runtime_mb": rss_runtime,
        "max_seq_len": backend.max_seq_len,
    }
    notes = []

    def timed_prefill(ids):
        t0 = time.perf_counter()
        logits = backend.forward(ids, 0)
        token = int(np.argmax(logits))
        return time.perf_counter() - t0, token

    prefill = {}
    for length in prompt_lengths:
        if length > limit - 1:
            notes.append(f"prompt {length} skipped: longer than max_seq_len {limit} - 1")
            prefill[str(length)] = None
            continue
        ids = rng.integers(1, vocab, length).tolist()
        runs = [timed_prefill(ids)[0] for _ in range(warmup + repeats)][warmup:]
        med = statistics.median(runs)
        prefill[str(length)] = {"tokens_per_s": length / med, "median_s": med, "runs_s": runs}
    result["prefill"] = prefill

    decode_prompt = min(prompt_lengths[0], max(1, limit - new_tokens - 1))
    steps = min(new_tokens, limit - decode_prompt - 1)
    if decode_prompt != prompt_lengths[0] or steps != new_tokens:
        notes.append(
            f"decode measured with a {decode_prompt}-token prompt and {steps} new tokens (max_seq_len {limit})"
        )
    ids = rng.integers(1, vocab, decode_prompt).tolist()
    ttft_runs, decode_runs = [], []
    for r in range(warmup + repeats):
        ttft, token = timed_prefill(ids)
        pos = decode_prompt
        t0 = time.perf_counter()
        for _ in range(steps):
            token = int(np.argmax(backend.forward([token], pos)))
            pos += 1
        elapsed = time.perf_counter() - t0
        if r >= warmup:
            ttft_runs.append(ttft)
            decode_runs.append(elapsed)
    med = statistics.median(decode_runs)
    result["ttft_s"] = statistics.median(ttft_runs)
    result["ttft_prompt_tokens"] = decode_prompt
    result["decode"] = {
        "tokens_per_s": steps / med if med > 0 else None,
        "median_s": med,
        "runs_s": decode_runs,
        "new_tokens": steps,
        "prompt_tokens": decode_prompt,
    }
    result["peak_rss_mb"] = memory_mib("VmHWM")
    if result["peak_rss_mb"] is not None and rss_runtime is not None:
        result["model_rss_mb"] = result["peak_rss_mb"] - rss_runtime  # see bench.py: "over runtime"
    result["torch_imported"] = "torch" in sys.modules
    # OpenMP's threads in this worker (torch's count; None without torch): 1 beside ExecuTorch (native.py)
    result["openmp_threads"] = sys.modules["torch"].get_num_threads() if result["torch_imported"] else None
    result["notes"] = notes
    backend.close()
    return result


def worker_main() -> None:
    """Entry point of a worker process: spec JSON on stdin, result JSON into spec["result_path"]."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = json.loads(sys.stdin.read())
    try:
        result = measure(spec)
    except Exception as err:  # reported in the table, not raised: one broken variant must not stop the rest
        result = {"error": f"{type(err).__name__}: {first_line(err)}"[:500]}
    Path(spec["result_path"]).write_text(json.dumps(result))


WORKER_BOOT = "from effllm.runtime.bench_worker import worker_main; worker_main()"


def run_target(target: Target, settings: BenchSettings) -> dict:
    """Measure ``target`` in a fresh Python process; the result dict (with "error" on failure)."""
    with tempfile.TemporaryDirectory(prefix="effllm-bench-") as tmp:
        spec = {
            "backend": target.backend,
            "path": target.path,
            "threads": settings.threads,
            "prompt_lengths": list(settings.prompt_lengths),
            "new_tokens": settings.new_tokens,
            "warmup": settings.warmup,
            "repeats": settings.repeats,
            "seed": settings.seed,
            "result_path": str(Path(tmp) / "result.json"),
        }
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        if target.backend == "executorch":
            # XNNPACK's pool does the work (sized by the backend); OpenMP's threads would only compete (native.py)
            env.update(EXECUTORCH_OPENMP_ENV)
        elif settings.threads:
            # torch/OpenMP read these at import; onnxruntime and llama.cpp get the count from the backend
            env.update(OMP_NUM_THREADS=str(settings.threads), MKL_NUM_THREADS=str(settings.threads))
        cmd = [sys.executable, "-c", WORKER_BOOT]
        try:
            proc = subprocess.run(
                cmd, input=json.dumps(spec), capture_output=True, text=True, timeout=settings.timeout_s, env=env
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {settings.timeout_s:.0f} s"}
        result_path = Path(spec["result_path"])
        if result_path.is_file():
            return json.loads(result_path.read_text())
        tail = [line for line in (proc.stderr or "").strip().splitlines() if line.strip()]
        return {"error": f"worker exited with {proc.returncode}: {tail[-1] if tail else 'no output'}"[:500]}
