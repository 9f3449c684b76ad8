"""effllm-bench: load time, time to first token, prefill and decode speed, peak memory, roofline.

For each backend and exported variant (torch on the model directory; onnxruntime and
onnxruntime-genai on onnx/, onnx-int8/, onnx-int4/; ExecuTorch on executorch/, executorch-8da4w/):
    load_s            a cold start: importing the backend's libraries (torch, onnxruntime, ...) and
                      constructing it (session / program / model) from the files on disk
    ttft_s            prompt of the first length (128) through the model until the first token is chosen
    prefill tok/s     prompt tokens / the prompt's forward pass, for each prompt length (128, 512)
    decode tok/s      new tokens / their time, one forward per token after a 128-token prompt (128 new)
    peak_rss_mb       the worker process's peak resident memory (VmHWM), imports included
    over runtime      peak_rss_mb minus the process's memory once the runtime's libraries are imported
                      (before the model loads): what the model costs in that runtime (weights, packed
                      copies, KV cache, activations), without the Python interpreter, torch, ...
    file_bytes        the model file(s)
Every number is the median over ``repeats`` runs after ``warmup`` runs. Prompts are random token ids
(seeded; speed does not depend on them), decoding is greedy and ignores EOS so every run does the
same work. Each (backend, variant) runs in its own process, so peak memory and thread settings are
its own and the ONNX runs never import torch.

Decode roofline: decoding one token reads every weight once, so it cannot beat
    roofline tok/s = memory bandwidth / bytes of weights read per token
The bandwidth is measured here (numpy reductions over 512 MiB on ``threads`` threads, best of 5), before
and after the runs (RunConditions); the roofline uses the higher. ``achieved / roofline`` = decode
tok/s / roofline tok/s.

Results: bench.json (everything, for machines), bench.md (the table), bench.png (a chart), written
atomically. Accuracy columns (top-1 agreement, perplexity change) come from effllm-export's
verify.json when it sits in the export directory.

The parts: bench_targets (what to run), bench_worker (one measurement, in its own process),
machine (CPU, load, bandwidth), roofline (bytes per token), bench_report (rows, ratios, files);
this module runs them in order.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from .bench_report import add_ratios, enrich, portable_path, read_verify
from .bench_targets import BenchSettings, plan_targets
from .bench_worker import run_target
from .machine import RunConditions


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
        "model": portable_path(model),
        "machine": machine,
        "settings": asdict(settings),
        "results": rows,
    }


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="run", leave=False)
