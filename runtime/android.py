"""effllm-bench --target android: ExecuTorch's llama runner on a phone, over adb.

What it does, per ExecuTorch variant of the export (executorch/, executorch-8da4w/):
    adb push model.pte tokenizer.json  -> /data/local/tmp/effllm/<variant>/
    adb push <runner>                  -> /data/local/tmp/effllm/llama_main
    adb shell ./llama_main --model_path=... --tokenizer_path=... --prompt=... --temperature=0
                           --seq_len=<prompt + new tokens> --cpu_threads=<threads>
(warm-up runs first, then repeats; each run loads the model afresh) and parses the runner's
stats line into the same report as the laptop benchmark. The runner is
ExecuTorch's examples/models/llama/main.cpp (``llama_main``), which drives the same C++
TextLLMRunner as Android's LlmModule. Build it for arm64-v8a with the Android NDK from an
ExecuTorch checkout of the same version as the pip package that exported the .pte; the steps are in
android_demo/README.md ("Benchmark from the command line"), and the binary lands in
cmake-out-android/examples/models/llama/llama_main, which is what --runner takes.

The stats line. The runner prints, after each generation (extension/llm/runner/stats.h,
``print_report``), one line ``PyTorchObserver {json}`` with millisecond timestamps:
    prompt_tokens, generated_tokens, model_load_start_ms, model_load_end_ms, inference_start_ms,
    prompt_eval_end_ms, first_token_ms, inference_end_ms, aggregate_sampling_time_ms,
    SCALING_FACTOR_UNITS_PER_SECOND (1000)
(executorch >= 1.x adds prefill_token_per_sec, decode_token_per_sec, model_execution_* and
aggregate_model_execution_time_ms). The rates below follow print_report's arithmetic:
    prefill tok/s = prompt_tokens / (prompt_eval_end - inference_start)
    decode tok/s  = generated_tokens / (inference_end - prompt_eval_end)
    TTFT          = first_token - inference_start;  load = model_load_end - model_load_start
generated_tokens excludes the first new token, which comes from the prompt's forward pass.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
from pathlib import Path

from effllm.common.errors import EffllmError

OBSERVER_TAG = "PyTorchObserver"
DEVICE_DIR = "/data/local/tmp/effllm"
RUNNER_NAME = "llama_main"
RSS_PATTERN = re.compile(r"RSS after [^:]*:\s*([0-9.]+)\s*MiB")
ADB_TIMEOUT_S = 60


class AndroidError(EffllmError):
    """The phone path cannot run: no adb, no device, no runner (exit code 2; the message says what to do)."""


# ---- the runner's stats ---------------------------------------------------------------------------
def parse_observer_lines(text: str) -> list[dict]:
    """Every ``PyTorchObserver {json}`` record in the runner's output, in order (tolerates other text on the line)."""
    decoder = json.JSONDecoder()
    records = []
    for line in text.splitlines():
        at = line.find(OBSERVER_TAG)
        if at < 0:
            continue
        brace = line.find("{", at)
        if brace < 0:
            continue
        try:
            record, _ = decoder.raw_decode(line, brace)
        except ValueError:
            continue
        if isinstance(record, dict) and "inference_start_ms" in record:
            records.append(record)
    return records


def observer_metrics(raw: dict) -> dict:
    """Seconds and tokens/s from one stats record (None where the record lacks what it needs)."""
    scale = float(raw.get("SCALING_FACTOR_UNITS_PER_SECOND") or 1000)

    def span(start: str, end: str) -> float | None:
        if start not in raw or end not in raw:
            return None
        value = (float(raw[end]) - float(raw[start])) / scale
        return value if value >= 0 else None

    def rate(tokens, seconds):
        return tokens / seconds if seconds and tokens is not None else None

    prompt, generated = raw.get("prompt_tokens"), raw.get("generated_tokens")
    prefill_s = span("inference_start_ms", "prompt_eval_end_ms")
    decode_s = span("prompt_eval_end_ms", "inference_end_ms")
    return {
        "prompt_tokens": prompt,
        "generated_tokens": generated,
        "load_s": span("model_load_start_ms", "model_load_end_ms"),
        "ttft_s": span("inference_start_ms", "first_token_ms"),
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": rate(prompt, prefill_s),
        "decode_s": decode_s,
        "decode_tokens_per_s": rate(generated, decode_s),
        "total_s": span("inference_start_ms", "inference_end_ms"),
    }


def peak_rss_mib(text: str) -> float | None:
    """The largest "RSS after ...: X MiB" the runner logged (its logging goes to logcat on some builds)."""
    values = [float(m.group(1)) for m in RSS_PATTERN.finditer(text)]
    values = [v for v in values if v > 0]
    return max(values) if values else None


# ---- adb ------------------------------------------------------------------------------------------
def find_adb(explicit: str | None = None) -> str:
    """adb from --adb, $ADB, PATH, or the SDK's platform-tools; AndroidError when there is none."""
    candidates = [explicit, os.environ.get("ADB"), shutil.which("adb")]
    for sdk in ("ANDROID_HOME", "ANDROID_SDK_ROOT"):
        if os.environ.get(sdk):
            candidates.append(str(Path(os.environ[sdk]) / "platform-tools" / "adb"))
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    if explicit:
        raise AndroidError(f"--adb {explicit} is not an executable file; give the path of Android's adb")
    raise AndroidError(
        "adb not found (not on PATH, $ADB or $ANDROID_HOME/platform-tools); install Android platform-tools, "
        "connect a phone with USB debugging on, and run again (or pass --adb PATH)"
    )


def adb_run(adb: str, args: list[str], serial: str | None = None, timeout: float = ADB_TIMEOUT_S) -> str:
    cmd = [adb] + (["-s", serial] if serial else []) + args
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, errors="replace")
    except subprocess.TimeoutExpired:
        raise AndroidError(
            f"'{' '.join(cmd[:4])} ...' did not answer within {timeout:.0f} s; check the phone"
        ) from None
    except OSError as err:
        raise AndroidError(f"cannot run {adb}: {err.strerror or err}") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise AndroidError(f"'adb {' '.join(args[:2])}' failed: {detail[-1] if detail else f'exit {proc.returncode}'}")
    return proc.stdout


def list_devices(adb: str) -> list[tuple[str, str]]:
    """(serial, state) for every line of ``adb devices`` (state "device" means ready)."""
    out = adb_run(adb, ["devices"])
    devices = []
    for line in out.splitlines():
        line = line.strip()
        if not line or line.startswith(("List of devices", "*")):
            continue
        parts = line.split()
        if len(parts) >= 2:
            devices.append((parts[0], parts[1]))
    return devices


def choose_device(devices: list[tuple[str, str]], serial: str | None) -> str:
    ready = [s for s, state in devices if state == "device"]
    if serial is not None:
        if serial in ready:
            return serial
        states = dict(devices)
        if serial in states:
            raise AndroidError(f"device {serial} is {states[serial]!r}, not ready; unlock it and accept USB debugging")
        raise AndroidError(f"no device {serial} (adb devices lists: {', '.join(ready) or 'none'}); check --serial")
    if not ready:
        others = ", ".join(f"{s} ({state})" for s, state in devices)
        raise AndroidError(
            "no Android device connected (adb devices lists "
            + (f"only {others}" if others else "none")
            + "); connect a phone with USB debugging on and accept the prompt, then run again"
        )
    if len(ready) > 1:
        raise AndroidError(f"several devices connected ({', '.join(ready)}); choose one with --serial")
    return ready[0]


# ---- the benchmark --------------------------------------------------------------------------------
def prompt_with_tokens(tokenizer_path: Path, n: int) -> tuple[str, int]:
    """ASCII English text that the tokenizer splits into about n tokens (and the exact count)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    base = (
        "The return statement leaves the current function call with the expression list as the return value. "
        "A list comprehension consists of brackets containing an expression followed by a for clause. "
        "Modules can import other modules, and it is customary to place all import statements at the beginning. "
    )
    ids: list[int] = []
    text = base
    while len(ids) < n:
        ids = tok.encode(text).ids
        text += base
    prompt = tok.decode(ids[:n])
    return prompt, len(tok.encode(prompt).ids)


def run_android_bench(
    variants: list[tuple[str, Path]],
    runner: str | Path | None,
    serial: str | None = None,
    adb: str | None = None,
    threads: int | None = None,
    prompt_lengths: tuple[int, ...] = (128, 512),
    new_tokens: int = 128,
    warmup: int = 1,
    repeats: int = 3,
    progress=None,
) -> dict:
    """Results in the laptop report's shape; AndroidError before any work when adb/device/runner is missing.

    variants: (name, directory holding model.pte and tokenizer.json).
    """
    adb_path = find_adb(adb)
    device = choose_device(list_devices(adb_path), serial)
    if not runner:
        raise AndroidError(
            "--runner PATH is required: ExecuTorch's llama_main built for arm64-v8a (build steps: "
            "android_demo/README.md, 'Benchmark from the command line')"
        )
    runner = Path(runner)
    if not runner.is_file():
        raise AndroidError(f"--runner {runner} is not a file; build llama_main for Android (android_demo/README.md)")
    if not variants:
        raise AndroidError("no ExecuTorch variant (model.pte) to benchmark; run effllm-export --format executorch")

    info = {
        "serial": device,
        "model": adb_run(adb_path, ["shell", "getprop", "ro.product.model"], device).strip(),
        "soc": adb_run(adb_path, ["shell", "getprop", "ro.soc.model"], device).strip(),
        "android": adb_run(adb_path, ["shell", "getprop", "ro.build.version.release"], device).strip(),
    }
    adb_run(adb_path, ["shell", "mkdir", "-p", DEVICE_DIR], device)
    adb_run(adb_path, ["push", str(runner), f"{DEVICE_DIR}/{RUNNER_NAME}"], device, timeout=600)
    adb_run(adb_path, ["shell", "chmod", "755", f"{DEVICE_DIR}/{RUNNER_NAME}"], device)

    results = []
    for name, vdir in variants:
        pte, tokenizer = vdir / "model.pte", vdir / "tokenizer.json"
        remote = f"{DEVICE_DIR}/{name}"
        adb_run(adb_path, ["shell", "mkdir", "-p", remote], device)
        adb_run(adb_path, ["push", str(pte), f"{remote}/model.pte"], device, timeout=1800)
        adb_run(adb_path, ["push", str(tokenizer), f"{remote}/tokenizer.json"], device, timeout=600)
        entry = {
            "backend": "executorch-android",
            "variant": name,
            "quantization": name.split("-", 1)[1] if "-" in name else "fp32",
            "path": str(pte),
            "file_bytes": pte.stat().st_size,
            "prefill": {},
            "error": None,
        }
        outputs = []
        for length in prompt_lengths:
            prompt, actual = prompt_with_tokens(tokenizer, length)
            runs = []
            for r in range(warmup + repeats):
                cmd = (
                    f"cd {DEVICE_DIR} && ./{RUNNER_NAME} --model_path={name}/model.pte "
                    f"--tokenizer_path={name}/tokenizer.json --prompt={shlex.quote(prompt)} --temperature=0 "
                    f"--seq_len={actual + new_tokens}" + (f" --cpu_threads={threads}" if threads else "")
                )
                output = adb_run(adb_path, ["shell", cmd], device, timeout=1800)
                outputs.append(output)
                records = parse_observer_lines(output)
                if not records:
                    raise AndroidError(
                        f"the runner printed no {OBSERVER_TAG} stats line for {name}; run the command by hand: "
                        f'adb shell "{cmd[:120]}..."'
                    )
                if r >= warmup:
                    runs.append(observer_metrics(records[-1]))
                if progress:
                    progress()
            entry["prefill"][str(length)] = _median_of(runs, "prefill_tokens_per_s", "prefill_s") | {
                "prompt_tokens": runs[0]["prompt_tokens"]
            }
            if length == prompt_lengths[0]:
                entry["ttft_s"] = _median([m["ttft_s"] for m in runs])
                entry["load_s"] = _median([m["load_s"] for m in runs])
                entry["decode"] = _median_of(runs, "decode_tokens_per_s", "decode_s") | {
                    "new_tokens": runs[0]["generated_tokens"]
                }
        entry["peak_rss_mb"] = peak_rss_mib("\n".join(outputs))
        results.append(entry)
    return {"device": info, "results": results}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _median_of(runs: list[dict], rate_key: str, seconds_key: str) -> dict:
    return {
        "tokens_per_s": _median([m[rate_key] for m in runs]),
        "median_s": _median([m[seconds_key] for m in runs]),
        "runs_s": [m[seconds_key] for m in runs],
    }
