"""effllm-bench: load time, time to first token, prefill and decode speed, peak memory, roofline.

For each backend and exported variant (torch on the model directory; onnxruntime and
onnxruntime-genai on onnx/, onnx-int8/, onnx-int4/; ExecuTorch on executorch/, executorch-8da4w/):
    load_s            a cold start: importing the backend's libraries (torch, onnxruntime, ...) and
                      constructing it (session / program / model) from the files on disk
    ttft_s            prompt of the first length (128) through the model until the first token is chosen
    prefill tok/s     prompt tokens / the prompt's forward pass, for each prompt length (128, 512)
    decode tok/s      new tokens / their time, one forward per token after a 128-token prompt (128 new)
    peak_rss_mb       the worker process's peak resident memory (VmHWM), imports included
    file_bytes        the model file(s)
Every number is the median over ``repeats`` runs after ``warmup`` runs. Prompts are random token ids
(seeded; speed does not depend on them), decoding is greedy and ignores EOS so every run does the
same work. Each (backend, variant) runs in its own process, so peak memory and thread settings are
its own and the ONNX runs never import torch.

Decode roofline: decoding one token reads every weight once, so it cannot beat
    roofline tok/s = memory bandwidth / bytes of weights read per token
The bandwidth is measured here (numpy reductions over 512 MiB on ``threads`` threads, best of 5), before
and after the runs (RunConditions); the roofline uses the higher.
Bytes per token: every weight tensor, except an embedding table that is only gathered from (one row
is read); a tied embedding is read in full by the output projection. For ONNX files this is read off
the graph; for the torch model off model.safetensors (run as float32); for .pte files it is estimated
from the model's config.json (found beside the export) and the quantization (8da4w: int4 + a bf16
scale per group of 32, int8 per-channel where the width is not a multiple of 32). KV-cache reads are
left out (small at these lengths). ``achieved / roofline`` = decode tok/s / roofline tok/s.

Results: bench.json (everything, for machines), bench.md (the table), bench.png (a chart), written
atomically. Accuracy columns (top-1 agreement, perplexity change) come from effllm-export's
verify.json when it sits in the export directory.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from effllm.fileio import write_atomic

from .generate import (
    BACKENDS,
    FORMAT_OF_BACKEND,
    find_model_files,
    quiet_native_output,
    read_json,
    sibling_model,
)

BENCH_BACKENDS = tuple(b for b in BACKENDS if b != "executorch-runner")
DEFAULT_PROMPT_LENGTHS = (128, 512)
DEFAULT_NEW_TOKENS = 128
INT4_GROUP = 32
WORKER_TIMEOUT_S = 3600


class BenchError(ValueError):
    """Input the user must fix (exit code 2)."""


@dataclass
class BenchSettings:
    threads: int | None = None
    prompt_lengths: tuple[int, ...] = DEFAULT_PROMPT_LENGTHS
    new_tokens: int = DEFAULT_NEW_TOKENS
    warmup: int = 1
    repeats: int = 3
    seed: int = 0
    timeout_s: float = WORKER_TIMEOUT_S


@dataclass
class Target:
    backend: str
    variant: str
    quantization: str
    path: str  # what load_backend takes
    file_bytes: int
    model: str = ""  # a label for the model (several models in one report)
    config_path: str | None = None  # config.json of the model, when found (for the .pte estimate)
    export_dir: str | None = None  # where verify.json may be


# ---- what to run ----------------------------------------------------------------------------------
def quantization_of(variant: str) -> str:
    return variant.split("-", 1)[1] if "-" in variant else "fp32"


def model_bytes(path: Path) -> int:
    """Bytes of the model itself: model.onnx(+.data), model.pte, or the weight files of a model directory."""
    if path.is_file():
        return path.stat().st_size
    names = ("model.onnx", "model.pte", "model.safetensors", "model-", "pytorch_model")
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name.startswith(names))


def plan_targets(
    model: str | Path, backends: list[str] | None = None, variants: list[str] | None = None, label: str = ""
) -> list[Target]:
    """Every (backend, variant) pair MODEL offers, filtered by ``backends`` / ``variants``."""
    model = Path(model)
    files = find_model_files(model)
    backends = list(backends or BENCH_BACKENDS)
    unknown = [b for b in backends if b not in BENCH_BACKENDS]
    if unknown:
        raise BenchError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BENCH_BACKENDS)}")
    available = set(files.variants) | ({"model"} if files.hf else set())
    if variants:
        missing = [v for v in variants if v not in available]
        if missing:
            raise BenchError(f"no variant {', '.join(missing)} in {model}; found: {', '.join(sorted(available))}")
    export_dir = None
    if files.variants:
        export_dir = str(next(iter(files.variants.values()))[1].parent)
    config_path = None
    if files.hf is not None:
        config_path = str(files.hf / "config.json")
    elif export_dir is not None:
        hf = sibling_model(Path(export_dir))
        if hf is not None and (hf / "config.json").is_file():
            config_path = str(hf / "config.json")
    targets = []
    for backend in backends:
        fmt = FORMAT_OF_BACKEND[backend]
        if fmt == "hf":
            if files.hf is not None and (not variants or "model" in variants):
                path = files.hf
                targets.append(
                    Target(backend, "model", "fp32", str(path), model_bytes(path), label, config_path, export_dir)
                )
            continue
        for name, (vfmt, vdir) in files.variants.items():
            if vfmt != fmt or (variants and name not in variants):
                continue
            path = vdir / "model.pte" if fmt == "pte" else vdir
            size = model_bytes(vdir / "model.pte") if fmt == "pte" else model_bytes(vdir)
            targets.append(
                Target(backend, name, quantization_of(name), str(path), size, label, config_path, export_dir)
            )
    if not targets:
        raise BenchError(
            f"nothing to benchmark in {model} for backends {', '.join(backends)}"
            + (f" and variants {', '.join(variants)}" if variants else "")
            + f" (found: {', '.join(sorted(available)) or 'nothing'})"
        )
    return targets


# ---- one measurement, in a worker process -----------------------------------------------------------
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
    from .generate import load_backend

    threads = spec.get("threads")
    prompt_lengths = [int(n) for n in spec["prompt_lengths"]]
    new_tokens, warmup, repeats = int(spec["new_tokens"]), int(spec["warmup"]), int(spec["repeats"])
    rss_before = memory_mib("VmRSS")
    start = time.perf_counter()
    with quiet_native_output():
        backend = load_backend(spec["backend"], spec["path"], threads)
    load_s = time.perf_counter() - start
    limit = backend.max_seq_len or 1 << 30
    vocab = backend.vocab_size or 256
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    result: dict = {"load_s": load_s, "rss_before_load_mb": rss_before, "max_seq_len": backend.max_seq_len}
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
    result["torch_imported"] = "torch" in sys.modules
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
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        result = {"error": f"{type(err).__name__}: {first}"[:500]}
    Path(spec["result_path"]).write_text(json.dumps(result))


# A fresh process per target: peak memory is then that backend's alone (the ONNX workers import no
# torch, as in an onnxruntime-only deployment; the worker records whether torch got imported).
WORKER_BOOT = "from effllm.runtime.bench import worker_main; worker_main()"


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
        if settings.threads:
            # torch/OpenMP read these at import; onnxruntime and ExecuTorch get the count from the backend
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


# ---- memory bandwidth and bytes per token -----------------------------------------------------------
def measure_bandwidth(threads: int | None = None, mib: int = 512, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: ``threads`` threads each reduce (max) their share of a float32 array."""
    from concurrent.futures import ThreadPoolExecutor

    threads = threads or os.cpu_count() or 1
    data = np.ones(mib * 2**20 // 4, dtype=np.float32)
    chunks = np.array_split(data, threads)
    best = math.inf
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.max, chunks))  # first touch
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.max, chunks))
            best = min(best, time.perf_counter() - t0)
    return data.nbytes / best


ONNX_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2, 21: 1, 22: 1}


def onnx_bytes_per_token(model_file: Path) -> int:
    """Bytes of initializers one decode step reads; gather-only tables (embeddings) count one row."""
    import onnx

    model = onnx.load(str(model_file), load_external_data=False)
    graph = model.graph
    uses: dict[str, list[tuple[str, int]]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            uses.setdefault(name, []).append((node.op_type, slot))
    total = 0
    for init in graph.initializer:
        numel = int(np.prod(init.dims)) if len(init.dims) else 1
        nbytes = numel * ONNX_ITEMSIZE.get(init.data_type, 4)
        if init.data_type in (21, 22):  # uint4 / int4: two per byte
            nbytes = (numel + 1) // 2
        consumers = uses.get(init.name, [])
        if consumers and all(op == "Gather" and slot == 0 for op, slot in consumers) and init.dims:
            nbytes = nbytes // max(int(init.dims[0]), 1)
        total += nbytes
    return total


def safetensors_bytes_per_token(model_dir: Path) -> int | None:
    """float32 bytes of the model's weights read per token, from model.safetensors headers."""
    shapes: dict[str, list[int]] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    for path in files:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    total = 0
    tied = not any(k.endswith("lm_head.weight") for k in shapes)
    for name, shape in shapes.items():
        numel = int(np.prod(shape)) if shape else 1
        if name.endswith("embed_tokens.weight") and not tied and shape:
            numel //= shape[0]
        total += numel * 4
    return total


def pte_bytes_per_token(config_path: Path, quantization: str, group: int = INT4_GROUP) -> int | None:
    """Estimated bytes per token of a .pte from the model's config (fp32, or 8da4w's int4/int8 weights)."""
    config = read_json(config_path)
    if not config:
        return None
    d, vocab = int(config["hidden_size"]), int(config["vocab_size"])
    head_dim = int(config.get("head_dim") or d // int(config["num_attention_heads"]))
    layers = int(config["num_hidden_layers"])
    per_layer = config.get("per_layer_config") or {}
    if isinstance(per_layer, list):
        per_layer = dict(enumerate(per_layer))
    per_layer = {int(k): v for k, v in per_layer.items()}  # keys are written as "00", "01", ...

    def layer_value(i: int, key: str) -> int:
        return int((per_layer.get(i) or {}).get(key, config[key]))

    linears = [(d, vocab)]  # (in, out): the output projection
    norms = d
    for i in range(layers):
        heads, kv, ffn = (
            layer_value(i, k) for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size")
        )
        if heads:
            linears += [(d, heads * head_dim), (d, kv * head_dim), (d, kv * head_dim), (heads * head_dim, d)]
            norms += d
        if ffn:
            linears += [(d, ffn), (d, ffn), (ffn, d)]
            norms += d

    def linear_bytes(n_in: int, n_out: int) -> float:
        if quantization == "fp32":
            return 4.0 * n_in * n_out
        if n_in % group == 0:  # int4 in groups, a bf16 scale per group
            return n_in * n_out * (0.5 + 2.0 / group)
        return n_in * n_out + 4.0 * n_out  # int8 per output channel, an fp32 scale per channel

    if quantization not in ("fp32", "8da4w"):
        return None
    return int(sum(linear_bytes(i, o) for i, o in linears) + 4 * (norms + d))  # + one embedding row


def weights_per_token(target: Target) -> tuple[int | None, str]:
    """(bytes, how they were found)."""
    path = Path(target.path)
    try:
        if target.backend == "torch":
            return safetensors_bytes_per_token(path), "model.safetensors as float32"
        if FORMAT_OF_BACKEND[target.backend] == "onnx":
            return onnx_bytes_per_token(path / "model.onnx"), "ONNX initializers"
        if target.config_path:
            return pte_bytes_per_token(Path(target.config_path), target.quantization), "estimated from config.json"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None, "unknown (no config.json found beside the export)"


# ---- the whole run --------------------------------------------------------------------------------
def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "onnxruntime", "onnxruntime-genai", "executorch", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def machine_info(threads: int | None) -> dict:
    return {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "platform": platform.platform(),
        "versions": versions(),
    }


class RunConditions:
    """Load and memory bandwidth around a benchmark run: measured at the start and again at finish().

    The roofline uses the higher bandwidth: other tenants of a shared machine only ever lower it.
    """

    def __init__(self, threads: int | None):
        self.threads = threads
        self.load_start = load_average()
        self.bandwidths = [measure_bandwidth(threads)]

    def finish(self) -> tuple[float, dict]:
        """(bandwidth for the roofline in bytes/s, the report's "machine" section)."""
        self.bandwidths.append(measure_bandwidth(self.threads))
        bandwidth = max(self.bandwidths)
        return bandwidth, machine_info(self.threads) | {
            "memory_bandwidth_gb_s": bandwidth / 1e9,
            "memory_bandwidth_measured_gb_s": [b / 1e9 for b in self.bandwidths],
            "load_average_start": self.load_start,
            "load_average_end": load_average(),
        }


def enrich(target: Target, result: dict, bandwidth: float | None, verify: dict) -> dict:
    """The target's row: its description, the measurement, bytes per token, roofline, accuracy."""
    row = asdict(target) | result
    row.setdefault("error", None)
    wbytes, how = weights_per_token(target)
    row["weight_bytes_per_token"], row["weight_bytes_source"] = wbytes, how
    decode = (result.get("decode") or {}).get("tokens_per_s")
    roof = bandwidth / wbytes if bandwidth and wbytes else None
    row["roofline_tokens_per_s"] = roof
    row["roofline_fraction"] = decode / roof if decode and roof else None
    accuracy = verify.get(target.variant) if target.backend != "torch" else None
    row["accuracy"] = (
        {k: accuracy.get(k) for k in ("top1_agreement", "ppl_increase", "max_abs_logit_diff", "passed")}
        if accuracy
        else None
    )
    return row


def read_verify(export_dir: str | None) -> dict:
    report = read_json(Path(export_dir) / "verify.json") if export_dir else {}
    return {v["name"]: v for v in report.get("variants", []) if isinstance(v, dict) and "name" in v}


def add_ratios(rows: list[dict]) -> None:
    """decode speed vs torch (same model) and vs the same backend's fp32 variant (quantization speed-up)."""

    def decode(row):
        return (row.get("decode") or {}).get("tokens_per_s")

    for row in rows:
        same_model = [r for r in rows if r.get("model", "") == row.get("model", "")]
        torch_row = next((r for r in same_model if r["backend"] == "torch" and decode(r)), None)
        fp32 = next(
            (r for r in same_model if r["backend"] == row["backend"] and r["quantization"] == "fp32" and decode(r)),
            None,
        )
        mine = decode(row)
        row["decode_vs_torch"] = mine / decode(torch_row) if mine and torch_row else None
        row["decode_vs_fp32"] = mine / decode(fp32) if mine and fp32 else None


def run_bench(
    model: str | Path,
    settings: BenchSettings,
    backends: list[str] | None = None,
    variants: list[str] | None = None,
    progress: bool = True,
) -> dict:
    """Benchmark every target of MODEL; the report dict (see write_report)."""
    targets = plan_targets(model, backends, variants)
    conditions = RunConditions(settings.threads)
    measured = []
    bar = _progress(len(targets), progress)
    for target in targets:
        bar.set_description(f"{target.backend} {target.variant}")
        measured.append((target, run_target(target, settings)))
        bar.update(1)
    bar.close()
    bandwidth, machine = conditions.finish()
    rows = [enrich(target, result, bandwidth, read_verify(target.export_dir)) for target, result in measured]
    add_ratios(rows)
    return {
        "kind": "cpu",
        "model": str(Path(model).resolve()),
        "machine": machine,
        "settings": asdict(settings),
        "results": rows,
    }


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="run", leave=False)


# ---- writing ----------------------------------------------------------------------------------------
def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _fmt(x, spec=".1f", scale=1.0):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x * scale, spec)


def markdown_table(report: dict) -> str:
    lengths = report["settings"]["prompt_lengths"]
    multi = len({r.get("model", "") for r in report["results"]}) > 1
    head = (["model"] if multi else []) + ["backend", "variant", "size MiB", "load s", "TTFT ms"]
    head += [f"prefill {n} tok/s" for n in lengths]
    head += ["decode tok/s", "vs torch", "vs fp32", "peak RSS MiB", "weights/token MiB", "roofline tok/s"]
    head += ["achieved/roofline", "top-1 agree", "ppl change"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        cells = [r.get("model", "")] if multi else []
        cells += [r["backend"], r["variant"], _fmt(r.get("file_bytes"), ".2f", 1 / 2**20)]
        if r.get("error"):
            cells += ["error: " + r["error"].replace("|", "/")] + ["-"] * (len(head) - len(cells) - 1)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        cells += [_fmt(r.get("load_s"), ".2f"), _fmt(r.get("ttft_s"), ".0f", 1000)]
        for n in lengths:
            p = (r.get("prefill") or {}).get(str(n))
            cells.append(_fmt(p and p.get("tokens_per_s"), ".0f"))
        acc = r.get("accuracy") or {}
        ppl = acc.get("ppl_increase")
        cells += [
            _fmt((r.get("decode") or {}).get("tokens_per_s"), ".1f"),
            _fmt(r.get("decode_vs_torch"), ".2f") + ("x" if r.get("decode_vs_torch") else ""),
            _fmt(r.get("decode_vs_fp32"), ".2f") + ("x" if r.get("decode_vs_fp32") else ""),
            _fmt(r.get("peak_rss_mb"), ".0f"),
            _fmt(r.get("weight_bytes_per_token"), ".1f", 1 / 2**20),
            _fmt(r.get("roofline_tokens_per_s"), ".1f"),
            _fmt(r.get("roofline_fraction"), ".2f"),
            _fmt(acc.get("top1_agreement"), ".3f"),
            "-" if ppl is None else f"{100 * ppl:+.2f}%",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    if report.get("kind") == "android":
        d = report.get("device", {})
        where = f"Android device {d.get('model') or '?'} ({d.get('soc') or '?'}, Android {d.get('android') or '?'}, serial {d.get('serial')})"
    else:
        bw = m.get("memory_bandwidth_gb_s")
        where = (
            f"{m.get('cpu')}, {m.get('logical_cpus')} logical CPUs, measured read bandwidth "
            f"{_fmt(bw, '.1f')} GB/s; load average {m.get('load_average_start')} at start, "
            f"{m.get('load_average_end')} at end"
        )
    notes = sorted({n for r in report["results"] for n in (r.get("notes") or [])})
    text = [
        "# effllm-bench",
        "",
        f"Model: `{report['model']}`  ",
        f"Machine: {where}  ",
        f"Threads: {s.get('threads') or 'runtime default'}; prompts {', '.join(map(str, s['prompt_lengths']))} tokens; "
        f"decode {s['new_tokens']} new tokens after a {s['prompt_lengths'][0]}-token prompt; "
        f"{s['warmup']} warm-up + {s['repeats']} measured runs, medians.",
        "",
        markdown_table(report),
        "",
        "load: a cold start, importing the backend's libraries included. "
        "TTFT: the first prompt through the model until the first token is chosen. vs torch: decode speed over "
        "torch eager's on the same model; vs fp32: over the same backend's fp32 variant. Roofline: memory "
        "bandwidth / bytes of weights read per token (an upper bound for decoding). top-1 agree / ppl change: "
        "effllm-export's verification of the variant against fp32 torch.",
    ]
    if notes:
        text += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(text) + "\n"


def chart_png(report: dict) -> bytes | None:
    """Decode and prefill speed per backend/variant as bars (PNG bytes); one row of panels per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    rows = [r for r in report["results"] if not r.get("error")]
    if not rows:
        return None
    models = list(dict.fromkeys(r.get("model", "") for r in rows))
    lengths = report["settings"]["prompt_lengths"]
    heights = [len([r for r in rows if r.get("model", "") == m]) for m in models]
    fig, axes = plt.subplots(
        len(models),
        2,
        figsize=(13, 0.42 * sum(heights) + 1.6 * len(models)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    for (ax_decode, ax_prefill), model in zip(axes, models):
        mine = [r for r in rows if r.get("model", "") == model]
        y = np.arange(len(mine))
        decode = [(r.get("decode") or {}).get("tokens_per_s") or 0 for r in mine]
        ax_decode.barh(y, decode, color="tab:blue", label="achieved")
        roof = [r.get("roofline_tokens_per_s") for r in mine]
        visible = [x for x in roof if x and x < 4 * max(decode + [1e-9])]  # a far-off roofline would flatten the bars
        if visible:
            ax_decode.scatter([x if x in visible else np.nan for x in roof], y, marker="|", s=300, color="tab:red",
                              label="roofline")  # fmt: skip
        ax_decode.set_title(f"{model + ': ' if model else ''}decode tokens/s", fontsize=10)
        ax_decode.legend(loc="lower right", fontsize=7)
        height = 0.8 / max(len(lengths), 1)
        for i, n in enumerate(lengths):
            vals = [((r.get("prefill") or {}).get(str(n)) or {}).get("tokens_per_s") or 0 for r in mine]
            ax_prefill.barh(y + (i - (len(lengths) - 1) / 2) * height, vals, height=height, label=f"prompt {n}")
        ax_prefill.set_title(f"{model + ': ' if model else ''}prefill tokens/s", fontsize=10)
        ax_prefill.legend(loc="lower right", fontsize=7)
        for ax in (ax_decode, ax_prefill):
            ax.set_yticks(y)
            ax.set_yticklabels([f"{r['backend']} / {r['variant']}" for r in mine], fontsize=8)
            ax.invert_yaxis()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(report: dict, out_dir: str | Path, stem: str = "bench") -> list[Path]:
    """stem.json, stem.md and stem.png in out_dir, each written atomically; the paths written."""
    out_dir = Path(out_dir)
    report = _clean(report)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    write_atomic(paths[0], json.dumps(report, indent=2) + "\n")
    write_atomic(paths[1], markdown_report(report))
    png = chart_png(report)
    if png is not None:
        paths.append(out_dir / f"{stem}.png")
        write_atomic(paths[2], png)
    return paths


def default_out(model: Path) -> Path:
    resolved = model.resolve()
    if resolved.is_file():
        resolved = resolved.parent
    if resolved.name in ("export", "model"):
        return resolved.parent / "bench"
    return resolved.with_name(resolved.name + "-bench")


def android_variants(model: Path, variants: list[str] | None) -> list[tuple[str, Path]]:
    files = find_model_files(model)
    found = [(name, vdir) for name, (fmt, vdir) in files.variants.items() if fmt == "pte"]
    if variants:
        found = [(n, p) for n, p in found if n in variants]
    return found


def android_report(model: Path, raw: dict, settings: BenchSettings) -> dict:
    rows = []
    for entry in raw["results"]:
        verify = read_verify(str(Path(entry["path"]).parent.parent)).get(entry["variant"]) or {}
        accuracy = {k: verify.get(k) for k in ("top1_agreement", "ppl_increase", "max_abs_logit_diff", "passed")}
        rows.append(entry | {"model": "", "accuracy": accuracy if verify else None})
    add_ratios(rows)
    return {
        "kind": "android",
        "model": str(model.resolve()),
        "device": raw["device"],
        "machine": {"threads": settings.threads},
        "settings": asdict(settings),
        "results": rows,
    }


__all__ = [
    "BenchError",
    "BenchSettings",
    "RunConditions",
    "Target",
    "measure_bandwidth",
    "plan_targets",
    "run_bench",
    "run_target",
    "write_report",
]
